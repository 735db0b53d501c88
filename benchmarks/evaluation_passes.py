"""Each metric's time against its pass-count limit, and the passes metrics share (run on demand).

    OMP_NUM_THREADS=1 python benchmarks/evaluation_passes.py [--model digits|resnet18] [--n 8] [--size 32]

The limit of a metric is its forward passes per input (``MetricSpec.forward_passes``) × the
inputs × the time of one pass per input at the batch size the metric runs (``--max-batch``),
measured on the same model right before the metric (interleaved), in this process's CPU time by
default (``--clock cpu``: other processes on a shared machine do not count),
through :meth:`esegeta.evaluation.Context.scores` as the metrics call it (so a faster layout
lowers the limit too: the ratio is what the metric costs beyond its passes), on the inference copy
the engine scores with (:func:`esegeta.evaluation.base.inference_copy`, made once; ``--plain``: the
model itself; passes counted by a hook on the scored copy). Re-explanations are
not counted (see benchmarks/evaluate_reexplain.py). The metric runs on the stacked inputs through
a :class:`esegeta.evaluation.Context`, as the engine calls it; with ``--through evaluate``, through
``esegeta.evaluate`` itself (the product's path: the inputs' targets given, the engine's own copy
made or not inside the timing, passes not counted). Prints per metric: passes per
input (the spec's, and those counted by a forward hook), seconds, the limit, their ratio (1.0:
nothing but the passes; the issue's goal is <= 1.2). Then all metrics once more with one
:class:`esegeta.evaluation.base.SharedPasses` per input, as the engine runs them: the passes
counted alone and together (the unperturbed input and the emptied input scored once).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from evaluation_models import TORCHVISION  # noqa: E402 (after the path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits", choices=("digits",) + TORCHVISION)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="image side (digits upsampled)")
    parser.add_argument("--max-batch", type=int, default=None, help="default: esegeta's default")
    parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                        help="cpu: this process's CPU time (time.process_time; steady on a shared machine, with "
                             "OMP_NUM_THREADS=1); wall: time.perf_counter")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated metric names")
    parser.add_argument("--scale", type=float, default=1.0, help="fewer steps/runs (0.25: a quarter) for big inputs")
    parser.add_argument("--plain", action="store_true", help="score with the model itself, not the inference copy")
    parser.add_argument("--through", default="metric", choices=("metric", "evaluate"),
                        help="metric: the metric called on a Context; evaluate: esegeta.evaluate")
    parser.add_argument("--maps", default="random", choices=("random", "smooth"),
                        help="random: Gaussian noise per pixel; smooth: that noise averaged over a window of an "
                             "eighth of the side (blobs, as real maps: ROAD's masks are then regions, not scattered)")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    import torch
    from evaluation_models import model_and_inputs
    import torch.nn.functional as F

    import esegeta
    from esegeta.evaluation import Context, metric
    from esegeta.evaluation.base import SharedPasses, inference_copy

    model, x = model_and_inputs(args.model, args.n, args.size)
    if args.model == "digits":
        x = F.interpolate(x, size=(args.size, args.size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        target = model(x).argmax(1)
    a = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    if args.maps == "smooth":
        window = max(1, args.size // 8) | 1
        a = F.avg_pool2d(a, window, 1, window // 2, count_include_pad=False)
    features = args.size * args.size

    def scaled(k: int) -> int:
        return max(2, round(k * args.scale))

    cases = {
        "deletion": {"steps": scaled(20)},
        "insertion": {"steps": scaled(20)},
        "pixel_flipping": {"features_in_step": max(1, features // scaled(64)), "baseline": "value"},
        "region_perturbation": {"patch_size": max(2, args.size // 8), "regions_evaluation": scaled(64),
                                "baseline": "value"},
        "faithfulness_correlation": {"nr_runs": scaled(100), "subset_size": features // 4},
        "infidelity": {"n_perturbations": scaled(32)},
        "road": {"percentages": list(range(10, 100, 10))},
    }
    only = [c for c in args.only.split(",") if c]
    cases = {k: v for k, v in cases.items() if not only or k in only}
    counted = [0]
    start = clock()
    scored = model if args.plain else inference_copy(model)  # as the engine: one copy per evaluation
    copy_seconds = clock() - start
    handle = scored.register_forward_hook(lambda m, inputs, out: counted.__setitem__(0, counted[0] + inputs[0].shape[0]))

    def context(**kw) -> Context:
        return Context(model=scored, max_batch=args.max_batch, use_inference_copy=False, **kw)

    rows = context().batch(x)  # the inputs per forward call the metrics make
    batch = x[torch.arange(rows) % args.n]

    def one_pass() -> float:
        ctx = context()
        best = float("inf")
        for _ in range(args.repeats + 1):
            start = clock()
            ctx.scores(batch)
            best = min(best, clock() - start)
        return best / rows

    try:
        print(f"{args.model}: {args.n} input(s) of {tuple(x.shape[1:])}, "
              f"max_batch {args.max_batch or 'default'} ({rows} a call), torch threads "
              f"{torch.get_num_threads()}; one pass {one_pass() * 1e3:.2f} ms per input at that batch size, "
              + ("the model itself" if args.plain else f"on the inference copy (made in {copy_seconds:.3f} s)"))
        print(f"{'metric':26} {'passes':>6} {'counted':>7} {'seconds':>8} {'limit':>8} {'ratio':>6}")
        alone = 0
        for name, params in cases.items():
            spec = metric(name)
            passes = spec.forward_passes(tuple(x.shape[1:]), params)
            per_input = one_pass()
            best = float("inf")
            for _ in range(args.repeats):
                ctx = context()
                counted[0] = 0
                start = clock()
                if args.through == "evaluate":
                    esegeta.evaluate(model, x, {"map": a}, [{"id": name, "params": params}], target=target.tolist(),
                                     max_batch=args.max_batch, inference_copy=not args.plain)
                else:
                    spec(ctx, x, a, target, **params)
                best = min(best, clock() - start)
            alone += counted[0]
            limit = passes * args.n * per_input
            seen = "-" if args.through == "evaluate" else f"{counted[0] / args.n:.1f}"
            print(f"{name:26} {passes:6d} {seen:>7} {best:8.3f} {limit:8.3f} {best / limit:6.2f}", flush=True)
        counted[0] = 0
        for i in range(args.n):  # as the engine: one SharedPasses per input, all metrics in turn
            shared = SharedPasses()
            for name, params in cases.items():
                metric(name)(context(shared=shared), x[i:i + 1], a[i:i + 1],
                             target[i:i + 1], **params)
        print(f"all metrics, passes per input: {alone / args.n:.1f} each alone, {counted[0] / args.n:.1f} sharing "
              "the unperturbed and the emptied input")
    finally:
        handle.remove()


if __name__ == "__main__":
    main()
