"""Where relevance stops adding up: Σ relevance and Σ|relevance| arriving at each leaf layer's output.

Relevance flows between layers as the gradient in both Captum's LRP and zennit's composites, so
a tensor hook on each leaf's output (registered before the library's own) sees the relevance that
reaches it; the table lists the leaves in forward order (Captum's: normalised to a seed of 1).
Σ that jumps between a layer and the layers it feeds points at a rule that does not conserve;
Σ|R| that grows while Σ stays put shows terms that cancel (the ε rule on mixed-sign inputs):

    python benchmarks/relevance_layers.py swinunetr captum.LRP --bias-free
    python benchmarks/relevance_layers.py real:vit_b_16 zennit.EpsilonGammaBox --bias-free

Models: those of benchmarks/conservation.py (``real:NAME`` for the zoo's real-depth tier).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conservation  # noqa: E402  (benchmarks/conservation.py: the models, zero_added)

import esegeta  # noqa: E402
from esegeta.attribution.prepare import prepared  # noqa: E402


def trace(model, x, method: str, target, wrapper, **params) -> tuple[torch.Tensor, list[tuple[str, float, float]]]:
    """The attribution, and (leaf name, Σ R, Σ|R|) at each leaf's output, in forward order (the last
    forward pass: Captum's LRP runs two)."""
    found: dict[str, list[float]] = {}
    order: list[str] = []

    def hook(name):
        def record(module, args, out):
            if not (torch.is_tensor(out) and out.requires_grad):
                return
            if name in found:
                order.remove(name)
            order.append(name)
            found[name] = [0.0, 0.0]

            def add(grad):
                found[name][0] += float(grad.double().sum())
                found[name][1] += float(grad.double().abs().sum())
            out.register_hook(add)
        return record

    ready = prepared(model, x)
    handles = [m.register_forward_hook(hook(n)) for n, m in ready.named_modules() if n and not m._modules]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attr = esegeta.explain(model, x, method, target=target, wrapper=wrapper, **params)
    finally:
        for handle in handles:
            handle.remove()
    return attr, [(n, *found[n]) for n in order]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("method")
    ap.add_argument("--bias-free", action="store_true", help="zero biases, class tokens and position embeddings")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=JSON",
                    help="a parameter of the method, e.g. conv_rule=zplus (repeatable)")
    args = ap.parse_args(argv)
    (_, (model, x, target, wrapper)), = conservation.cases([args.model])
    if args.bias_free:
        conservation.zero_added(model)
    params = conservation.parse_params(args.param)
    attr, rows = trace(model, x, args.method, target, wrapper, **params)
    print(f"Σ attribution {float(attr.double().sum()):.4g}; "
          f"{conservation.ratio(args.method, model, x, target, wrapper, params)}"
          " × what it explains")
    print(f"{'layer':64s} {'Σ R':>12s} {'Σ|R|':>12s}")
    for name, total, magnitude in rows:
        print(f"{name:64s} {total:12.4g} {magnitude:12.4g}")


if __name__ == "__main__":
    main()
