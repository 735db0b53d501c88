"""Each metric's time against its pass-count limit (run on demand).

    OMP_NUM_THREADS=1 python benchmarks/evaluation_passes.py [--model digits|resnet18] [--n 8] [--size 32]

The limit of a metric is its forward passes per input (``MetricSpec.forward_passes``) × the
inputs × the time of one pass per input at the batch size the metric runs (``--max-batch``),
measured here on the same model; re-explanations are not counted (see
benchmarks/evaluate_reexplain.py). The metric runs on the stacked inputs through a
:class:`esegeta.evaluation.Context`, as the engine calls it. Prints per metric: passes per input,
seconds, the limit, and their ratio (1.0: nothing but the passes; the issue's goal is <= 1.2).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits", choices=("digits", "resnet18"))
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="image side (digits upsampled)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    from evaluation_models import model_and_inputs
    import torch.nn.functional as F

    from esegeta.evaluation import Context, metric

    model, x = model_and_inputs(args.model, args.n, args.size)
    if args.model == "digits":
        x = F.interpolate(x, size=(args.size, args.size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        target = model(x).argmax(1)
    a = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    features = args.size * args.size
    cases = {
        "deletion": {"steps": 20},
        "insertion": {"steps": 20},
        "pixel_flipping": {"features_in_step": max(1, features // 64)},
        "region_perturbation": {"patch_size": max(2, args.size // 8), "regions_evaluation": 64},
        "faithfulness_correlation": {"nr_runs": 100, "subset_size": features // 4},
        "infidelity": {"n_perturbations": 32},
        "road": {"percentages": list(range(10, 100, 10))},
    }
    batch = x[torch.arange(args.max_batch) % args.n]

    def one_pass() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(batch)
        return (time.perf_counter() - start) / args.max_batch

    per_input = min(one_pass() for _ in range(args.repeats + 1))
    print(f"{args.model}: {args.n} input(s) of {tuple(x.shape[1:])}, max_batch {args.max_batch}, one pass "
          f"{per_input * 1e3:.2f} ms per input at that batch size")
    print(f"{'metric':26} {'passes':>6} {'seconds':>8} {'limit':>8} {'ratio':>6}")
    for name, params in cases.items():
        spec = metric(name)
        passes = spec.forward_passes(tuple(x.shape[1:]), params)
        best = float("inf")
        for _ in range(args.repeats):
            ctx = Context(model=model, max_batch=args.max_batch)
            start = time.perf_counter()
            spec(ctx, x, a, target, **params)
            best = min(best, time.perf_counter() - start)
        limit = passes * args.n * per_input
        print(f"{name:26} {passes:6d} {best:8.3f} {limit:8.3f} {best / limit:6.2f}", flush=True)


if __name__ == "__main__":
    main()
