"""Time of one scoring pass per input against the batch size, on torchvision models at 224² (run on demand).

    OMP_NUM_THREADS=1 python benchmarks/evaluation_batch.py [--models resnet18,mobilenet_v3_small,densenet121]
        [--size 224] [--batches 8,16,32,64] [--repeats 2]

What the batch size of a scoring pass costs on this machine (the evidence for
``esegeta.evaluation.base.CPU_FORWARD_VALUES``): each model (random weights, eval mode) is scored
on its inference copy (:func:`esegeta.evaluation.base.inference_copy`, as the engine scores on the
CPU), the input channels-last, without gradients, called directly at each batch size (not through
:meth:`esegeta.evaluation.Context.scores`, which caps the batch on the CPU);
prints the best-of-``repeats`` milliseconds per input (this process's CPU time by default, ``--clock
wall`` for wall time) and each batch size's time relative to the fastest.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v3_small,densenet121")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="8,16,32,64")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"))
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    import esegeta  # noqa: F401 (before torchvision: the compatibility shim)
    import torch
    import torchvision

    from esegeta.evaluation.base import channels_last, inference_copy

    batches = [int(b) for b in args.batches.split(",")]
    print(f"torch threads {torch.get_num_threads()}, {args.size}² RGB, ms per input ({args.clock} time)")
    print(f"{'model':22}" + "".join(f"{b:>14}" for b in batches))
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(num_classes=10).eval()
        scored = inference_copy(model) or model
        x = torch.rand(max(batches), 3, args.size, args.size)
        per_input = []
        for b in batches:
            batch = channels_last(x[:b])
            with torch.no_grad():
                scored(batch)  # warm-up
                best = float("inf")
                for _ in range(args.repeats):
                    start = clock()
                    scored(batch)
                    best = min(best, clock() - start)
            per_input.append(best / b * 1e3)
        fastest = min(per_input)
        print(f"{name:22}" + "".join(f"{t:8.1f} ({t / fastest:.2f})" for t in per_input), flush=True)


if __name__ == "__main__":
    main()
