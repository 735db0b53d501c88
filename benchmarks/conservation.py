"""The conservation table: Σ relevance ÷ what it explains, per model and method.

LRP (Captum's: ÷ the explained score; zennit's composites: ÷ their seed, 1) and DeepLIFT / IG
(÷ f(x) − f(0), the zero baseline they default to), computed here from the wrapped model
directly (not from esegeta's own check), so the same script measures an older esegeta:

    python benchmarks/conservation.py                  # markdown table
    python benchmarks/conservation.py --bias-free      # biases, class tokens, position embeddings zeroed
    python benchmarks/conservation.py --real           # also benchmarks/zoo.py's real-depth tier
    python benchmarks/conservation.py --param conv_rule=epsilon   # a parameter, for the methods that take it
    PYTHONPATH=/path/to/older/checkout python benchmarks/conservation.py   # before

Models: the three samples (the demo's retina crop at full size), MONAI's UNet of issue 21 (3D,
32³, freshly initialised), a few zoo models (tests/zoo_models.py: the transformers ViT, UNETR and
SwinUNETR among them) and a small timm ViT. A result that is not
finite, or an error, is shown as such.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "tests",):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import esegeta  # noqa: E402
from esegeta.attribution import wrappers  # noqa: E402
from esegeta.spec import registry  # noqa: E402

METHODS = ("captum.LRP", "zennit.EpsilonPlus", "zennit.EpsilonGammaBox", "captum.DeepLift",
           "captum.IntegratedGradients")
#: Parameters that are constants added to the data: under the ε rule they take relevance by design
#: (what ``--bias-free`` zeroes, to measure the rules alone).
ADDED = ("bias", "cls_token", "class_token", "pos_embed", "pos_embedding", "position_embeddings")
PARAMS = {"captum.IntegratedGradients": {"n_steps": 64, "internal_batch_size": 16}}


def _monai_unet():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64), strides=(2, 2),
               num_res_units=2).eval()
    g = torch.linspace(0, 1, 32)
    x = ((g[:, None, None] * g[None, :, None] + g[None, None, :] * 0.5) / 1.5)[None, None]
    return net, x, 1, {"name": "multiclass", "activation": "softmax"}


def _timm_vit():
    import timm

    torch.manual_seed(0)
    net = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                        num_classes=5).eval()
    torch.nn.init.normal_(net.head.weight, std=0.5)
    return net, torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)), 0, None


def cases(names, real: bool = False):
    import conftest
    import zoo_models

    found = {"retina_demo": lambda: conftest.retina_case(size=128), "tissue3d": conftest.tissue_case,
             "digits": conftest.digits_case, "monai_unet3d": _monai_unet, "timm_vit": _timm_vit}
    for name in ("resnet18", "densenet121", "unet2d", "segresnet", "vit", "unetr", "swinunetr"):
        found[name] = getattr(zoo_models, name)
    if real or any(n.startswith("real:") for n in names or ()):
        import zoo  # benchmarks/zoo.py: the real-depth tier

        torch.manual_seed(0)
        found.update({f"real:{name}": make for name, make in zoo._real_tier().items()})
    for name in names or [n for n in found if real or not n.startswith("real:")]:
        c = found[name]()
        if isinstance(c, tuple):
            yield name, c
        else:
            yield name, (c.model, c.x, c.target, c.wrapper)


def _scores(model, x, wrapper, inputs):
    with torch.no_grad():
        if wrapper is None:
            return model(inputs)
        return wrappers.build(model, x, wrapper)(inputs)


def parse_params(pairs: list[str]) -> dict:
    """``NAME=VALUE`` pairs (VALUE as JSON where it parses, else a string) as a dict."""
    def value(text):
        try:
            return json.loads(text)
        except ValueError:
            return text

    return {name: value(text) for name, _, text in (p.partition("=") for p in pairs)}


def ratio(method, model, x, target, wrapper, params: dict | None = None):
    accepted = registry.get(method).parameters()
    own = {k: v for k, v in (params or {}).items() if k in accepted}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attr = esegeta.explain(model, x, method, target=target, wrapper=wrapper, **PARAMS.get(method, {}), **own)
    if not torch.isfinite(attr).all():
        return f"non-finite ({int((~torch.isfinite(attr)).sum())} of {attr.numel()})"
    total = float(attr.double().sum())
    score = float(_scores(model, x, wrapper, x)[0, target])
    if method.startswith("zennit."):  # the LRP composites' seed
        explained = 1.0
    elif method == "captum.LRP":
        explained = score
    else:
        explained = score - float(_scores(model, x, wrapper, torch.zeros_like(x))[0, target])
    return f"{total / explained:.4g}"


def zero_added(model) -> None:
    """Zero ``model``'s :data:`ADDED` parameters (in place: the benchmark's own copy)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ADDED:
                p.zero_()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--bias-free", action="store_true", help="zero biases, class tokens and position embeddings")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=JSON",
                    help="a parameter for the methods that take it, e.g. conv_rule=zplus (repeatable)")
    ap.add_argument("--real", action="store_true", help="also the real-depth tier of benchmarks/zoo.py (real:NAME)")
    args = ap.parse_args(argv)
    print("| model | " + " | ".join(args.methods) + " |")
    print("|---|" + "---|" * len(args.methods))
    for name, (model, x, target, wrapper) in cases(args.models, args.real):
        if args.bias_free:
            zero_added(model)
        cells = []
        for method in args.methods:
            start = time.perf_counter()
            try:
                cells.append(ratio(method, model, x, target, wrapper, parse_params(args.param)))
            except Exception as exc:  # noqa: BLE001 (a cell's outcome, whatever it is)
                cells.append(f"{type(exc).__name__}")
            print(f"  {name} {method}: {cells[-1]} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
