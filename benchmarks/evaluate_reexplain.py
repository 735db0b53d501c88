"""Re-explaining metrics through ``esegeta.evaluate``: time per input against their pass-count limit (run on demand).

    OMP_NUM_THREADS=1 python benchmarks/evaluate_reexplain.py [--model resnet18|digits] [--n 8] [--size 64]

MPRT, smooth MPRT, efficient MPRT and random logit re-explain with the method that made the
attribution (captum.Saliency here: one forward and one backward pass per input). The limit of a
metric is its re-explanations × the time of one Saliency call on the same batch, measured
here on the same model; the ratio says how much time goes elsewhere (preparing model copies,
randomising layers, similarity). Times are this process's CPU time (steady on a shared machine,
with OMP_NUM_THREADS=1). Prints per metric: re-explanations per input, measured
seconds, the limit, and their ratio.
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
    parser.add_argument("--model", default="resnet18", choices=("resnet18", "digits"))
    parser.add_argument("--n", type=int, default=8, help="inputs")
    parser.add_argument("--size", type=int, default=64, help="image side (resnet18)")
    parser.add_argument("--nr-samples", type=int, default=4, help="smooth MPRT's noisy copies")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    from evaluation_models import model_and_inputs

    import esegeta
    from captum.attr import Saliency

    from esegeta.evaluation.randomisation import randomisable_layers

    model, x = model_and_inputs(args.model, args.n, args.size)
    with torch.no_grad():
        target = model(x).argmax(1)
    attribution = Saliency(model).attribute(x.clone().requires_grad_(True), target=target).detach()
    layers = len(randomisable_layers(model))

    def one_explanation() -> float:
        start = time.process_time()
        for i in range(args.n):
            Saliency(model).attribute(x[i:i + 1].clone().requires_grad_(True), target=int(target[i]))
        return (time.process_time() - start) / args.n

    per_explanation = min(one_explanation() for _ in range(args.repeats))
    cases = {"mprt": ({}, layers), "smooth_mprt": ({"nr_samples": args.nr_samples}, layers * args.nr_samples),
             "efficient_mprt": ({}, 1), "random_logit": ({}, 1)}
    print(f"{args.model}: {args.n} input(s) of {tuple(x.shape[1:])}, {layers} randomisable layers, "
          f"one Saliency call {per_explanation * 1e3:.1f} ms per input")
    print(f"{'metric':16} {'explains':>8} {'s/input':>8} {'limit':>8} {'ratio':>6}")
    for name, (params, explanations) in cases.items():
        best = float("inf")
        for _ in range(args.repeats):
            start = time.process_time()
            result = esegeta.evaluate(model, x, {"captum.Saliency": attribution}, [{"id": name, "params": params}],
                                      target="predicted")
            best = min(best, time.process_time() - start)
        errors = [r["error"] for r in result.rows if r.get("error")]
        if errors:
            print(f"{name:16} failed: {errors[0]}")
            continue
        limit = explanations * per_explanation
        print(f"{name:16} {explanations:8d} {best / args.n:8.3f} {limit:8.3f} {best / args.n / limit:6.2f}")


if __name__ == "__main__":
    main()
