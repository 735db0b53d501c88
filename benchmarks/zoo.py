"""Every applicable registered method on architectures nobody here wrote: the cell table.

Models (tests/zoo_models.py): torchvision resnet18, densenet121, efficientnet_b0,
mobilenet_v3_small, convnext_tiny and a small VisionTransformer; MONAI UNet (2D, 3D),
BasicUNet, AttentionUnet, DynUNet (deep supervision, after a training step), SegResNet (3D),
UNETR (3D), SwinUNETR (2D), the segmenters through a threshold wrapper. Small sizes, random
weights, BatchNorm statistics calibrated on random batches.

Each (method, model) cell is one of:

- ``ran``: ``esegeta.explain`` returned a finite, not all-zero result;
- ``refused``: refused before the run (:func:`esegeta.attribution.architectures.refusals`, what
  ``validate``/``check`` report), with the reason;
- ``flat``: it ran and returned an all-zero or constant map, which the runner records with a
  warning naming the likely cause (a vanishing gradient, too few samples...);
- ``failed``: anything else (an exception, a non-finite result): the goal is none.

    python benchmarks/zoo.py                       # every model, every method: markdown table
    python benchmarks/zoo.py --models resnet18 vit --libraries captum gradcam --json cells.json
    python benchmarks/zoo.py --check               # and `esegeta check` on six models' cells vs the run
    python benchmarks/zoo.py --tier real --hard    # the usual depths (ResNet-50 ... SwinUNETR), hard cells

Also reports, per model, IG completeness (|sum(attr) - (f(x) - f(0))| / |f(x) - f(0)|, 256
steps) and DeepLift summation to delta (same relative error).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import esegeta  # noqa: E402
from esegeta.attribution import architectures  # noqa: E402
from esegeta.spec import registry  # noqa: E402
from esegeta.attribution.prepare import prepared  # noqa: E402

from test_conformance import _most_active_neuron  # noqa: E402 (the conformance suite's choice of neuron)
from zoo_models import ZOO, ZooModel, method_params, method_wrapper  # noqa: E402

#: The models ``--check`` runs ``esegeta check`` on by default (torchvision and MONAI, CNNs and transformers).
CHECK_SAMPLE = ("resnet18", "densenet121", "efficientnet_b0", "vit", "unet2d", "swinunetr")
#: Methods whose cost is one forward per channel/mask/step beyond what quick params bound (minutes on a CPU).
SLOW = frozenset({"lucent.render_vis"})


def _real(name, build, shape, layer, leaf, wrapper=True, target=0, reshape=None) -> ZooModel:
    """A model at the depth people train it (small spatial size), BatchNorm statistics calibrated."""
    from zoo_models import SEG_WRAPPER, _input, calibrate

    torch.manual_seed(0)
    model = calibrate(build(), shape)
    return ZooModel(name, model, _input(shape), layer, leaf, wrapper=dict(SEG_WRAPPER) if wrapper else None,
                    target=target, reshape_transform=reshape)


def _real_tier() -> dict:
    """``--tier real``: torchvision classifiers and MONAI segmenters at their usual depths and widths
    (ResNet-50, DenseNet-121, EfficientNet-B0, ViT-B/16; MONAI UNet, SegResNet, UNETR, SwinUNETR with
    their default widths), small inputs (64² images, 32³ volumes, SwinUNETR 2D at 64²)."""
    from esegeta.compat import import_torchvision

    import_torchvision()
    import monai.networks.nets as nets
    import torchvision as tv

    def vit_b16():
        model = tv.models.VisionTransformer(image_size=64, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768,
                                            mlp_dim=3072, num_classes=5)
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at zero
        return model

    c2, v3 = (1, 3, 64, 64), (1, 1, 32, 32, 32)
    return {
        "resnet50": lambda: _real("resnet50", lambda: tv.models.resnet50(num_classes=5), c2, "layer4",
                                  "layer4.2.conv3", wrapper=False),
        "densenet121_full": lambda: _real("densenet121_full", lambda: tv.models.densenet121(num_classes=5), c2,
                                          "features", "features.denseblock4.denselayer16.conv2", wrapper=False),
        "efficientnet_b0_full": lambda: _real("efficientnet_b0_full", lambda: tv.models.efficientnet_b0(num_classes=5),
                                              c2, "features", "features.8.0", wrapper=False),
        "vit_b_16": lambda: _real("vit_b_16", vit_b16, c2, "encoder.layers.encoder_layer_11.ln_1", "conv_proj",
                                  wrapper=False, reshape="vit"),
        "monai_unet3d": lambda: _real("monai_unet3d", lambda: nets.UNet(3, 1, 2, channels=(16, 32, 64, 128, 256),
                                                                        strides=(2, 2, 2, 2), num_res_units=2),
                                      v3, "model.1.submodule.1", "model.0.conv.unit0.conv"),
        "segresnet3d": lambda: _real("segresnet3d", lambda: nets.SegResNet(3, in_channels=1, out_channels=2), v3,
                                     "down_layers.3", "convInit.conv"),
        "unetr3d": lambda: _real("unetr3d", lambda: nets.UNETR(1, 2, img_size=(32, 32, 32)), v3, "encoder4",
                                 "encoder1.layer.conv1.conv"),
        "swinunetr2d": lambda: _real("swinunetr2d", lambda: nets.SwinUNETR(1, 2, spatial_dims=2), (1, 1, 64, 64),
                                     "encoder10", "encoder1.layer.conv1.conv"),
    }


#: ``--hard``: the cells the rule-based methods find hardest (LRP, DeepLIFT, DeepSHAP, FullGrad).
HARD = ("shap.DeepExplainer", "captum.LRP", "captum.DeepLift", "zennit.EpsilonPlus", "gradcam.FullGrad",
        "captum.LayerLRP", "captum.DeepLiftShap", "zennit.EpsilonGammaBox")


def applicable(spec, z: ZooModel) -> bool:
    return z.dims in spec.dims and z.task in spec.tasks


def layer_of(spec, z: ZooModel) -> str | None:
    return (z.leaf_layer if spec.leaf_layer else z.layer) if spec.needs_layer else None


def params_of(spec, z: ZooModel, layer: str | None) -> dict:
    params = {k: (v(z.x) if callable(v) else v) for k, v in spec.quick_params.items()}
    if spec.kind == "neuron":
        params["neuron_selector"] = _most_active_neuron(z.model, z.x, layer)
    if z.reshape_transform and "reshape_transform" in spec.adapter.parameters(spec):
        params["reshape_transform"] = z.reshape_transform
    return params | method_params(spec.id, z)


def cell(spec, z: ZooModel) -> dict:
    """One (method, model) cell: ran / refused (reason) / failed (error)."""
    layer = layer_of(spec, z)
    params = params_of(spec, z, layer)
    row = {"model": z.name, "method": spec.id, "library": spec.library.name}
    wrapper = method_wrapper(spec.id, z)
    ready = prepared(z.model, z.x)
    reasons = architectures.refusals(spec, ready, z.x, layer=layer, params=params, wrapper=wrapper)
    if reasons:
        return row | {"status": "refused", "reason": "; ".join(map(str, reasons))}
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    start = time.perf_counter()
    try:
        attr = esegeta.explain(z.model, z.x, spec.id, target=z.target if spec.needs_target else None,
                               wrapper=wrapper, layer=layer, **params)
    except Exception as exc:  # noqa: BLE001 (the table records every failure)
        return row | {"status": "failed", "reason": f"{type(exc).__name__}: {str(exc)[:300]}",
                      "where": traceback.format_exc(limit=-2)[-600:], "seconds": time.perf_counter() - start}
    seconds = round(time.perf_counter() - start, 3)
    if not torch.isfinite(attr).all():
        return row | {"status": "failed", "reason": "non-finite result", "seconds": seconds}
    if attr.abs().sum() == 0 or float(attr.max()) == float(attr.min()):
        # the runner records these ok with a warning naming the likely cause (esegeta.attribution.verdicts): not silent
        return row | {"status": "flat", "reason": "all-zero or constant result (warned)", "seconds": seconds}
    return row | {"status": "ran", "seconds": seconds}


def axioms(z: ZooModel, steps: int = 256) -> dict:
    """IG completeness and DeepLift summation to delta (relative errors, zero baseline)."""
    from esegeta.attribution.wrappers import build
    from esegeta.spec.request import WrapperConfig

    ready = prepared(z.model, z.x)
    forward = ready if z.wrapper is None else build(ready, z.x, WrapperConfig(**z.wrapper), None)
    with torch.no_grad():
        delta = float(forward(z.x)[0, z.target] - forward(torch.zeros_like(z.x))[0, z.target])
    out = {"model": z.name, "f(x)-f(0)": delta}
    for method, params in (("captum.IntegratedGradients", {"n_steps": steps, "internal_batch_size": 32}),
                           ("captum.DeepLift", {})):
        try:
            attr = esegeta.explain(z.model, z.x, method, target=z.target, wrapper=z.wrapper, **params)
            out[method] = abs(float(attr.double().sum()) - delta) / max(abs(delta), 1e-12)
        except Exception as exc:  # noqa: BLE001
            out[method] = f"{type(exc).__name__}: {str(exc)[:160]}"
    return out


FACTORY = """
import sys
sys.path.insert(0, {tests!r})
from zoo_models import ZOO


def build():
    return ZOO[{name!r}]().model
"""


def check_predictions(z: ZooModel, specs, cells: list[dict], workdir: Path) -> list[dict]:
    """``esegeta check`` on a config holding every cell of ``z`` whose params JSON can carry: its
    verdict (refused or not) per method, beside the cell's status in the run."""
    from esegeta.run.check import check

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"{z.name}_factory.py").write_text(FACTORY.format(tests=str(ROOT / "tests"), name=z.name))
    np.save(workdir / f"{z.name}.npy", z.x[0].numpy())
    status = {c["method"]: c["status"] for c in cells if c["model"] == z.name}
    methods, rows = [], []
    for spec in specs:
        if spec.id not in status:
            continue
        layer = layer_of(spec, z)
        entry = {"id": spec.id, "params": params_of(spec, z, layer)}
        try:
            json.dumps(entry["params"])
        except TypeError:
            continue  # a tensor param (PatternNet's fitting data): Python only
        if layer:
            entry["layer"] = layer
        if method_wrapper(spec.id, z) is not None:
            entry["wrapper"] = method_wrapper(spec.id, z)
        methods.append(entry)
    cfg = {"model": {"factory": str(workdir / f"{z.name}_factory.py") + ":build"},
           "inputs": {"paths": [str(workdir / f"{z.name}.npy")], "spatial_dims": z.dims, "channel_axis": "first"},
           "target": z.target, "output": {"dir": str(workdir / "out"), "formats": ["npy"]}, "methods": methods}
    report = check(cfg, base_dir=workdir)
    for entry, verdict in zip(methods, report.methods):
        rows.append({"model": z.name, "method": entry["id"], "predicted": "ok" if verdict.ok else "refused",
                     "run": status[entry["id"]], "problems": verdict.problems[:1]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--tier", choices=("test", "real"), default="test",
                    help="test: tests/zoo_models.py (tiny widths); real: the usual depths (_real_tier)")
    ap.add_argument("--hard", action="store_true", help=f"only the hard cells: {', '.join(HARD)}")
    ap.add_argument("--libraries", nargs="*", default=None)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--json", default=None, help="write every cell here")
    ap.add_argument("--no-axioms", action="store_true")
    ap.add_argument("--slow", action="store_true", help=f"also run {', '.join(sorted(SLOW))}")
    ap.add_argument("--check", nargs="*", default=None, metavar="MODEL",
                    help="also run `esegeta check` on these models' cells (default with the flag: a sample of six) "
                         "and compare its verdicts with the run")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    zoo = _real_tier() if args.tier == "real" else ZOO
    args.models = args.models or list(zoo)
    methods = HARD if args.hard else args.methods
    specs = [s for s in registry.all_methods().values()
             if (args.libraries is None or s.library.name in args.libraries)
             and (methods is None or s.id in methods) and (args.slow or s.id not in SLOW)]
    cells, axiom_rows = [], []
    start = time.perf_counter()
    for name in args.models:
        z = zoo[name]()
        for spec in specs:
            if applicable(spec, z):
                c = cell(spec, z)
                cells.append(c)
                if c["status"] != "ran":
                    print(f"{name:18s} {spec.id:40s} {c['status']}: {c['reason'][:200]}", file=sys.stderr, flush=True)
        if not args.no_axioms:
            axiom_rows.append(axioms(z))
    wall = time.perf_counter() - start
    libs = sorted({c["library"] for c in cells})
    print("ran/refused/flat/failed per model and library\n")
    print(f"| model | {' | '.join(libs)} | total |\n|---|{'---|' * (len(libs) + 1)}")
    for name in args.models:
        row = [c for c in cells if c["model"] == name]

        def fmt(cs):
            n = Counter(c["status"] for c in cs)
            return f"{n['ran']}/{n['refused']}/{n['flat']}/{n['failed']}"
        print(f"| {name} | {' | '.join(fmt([c for c in row if c['library'] == lib]) for lib in libs)} | {fmt(row)} |")
    n = Counter(c["status"] for c in cells)
    print(f"\ncells (ran/refused/flat/failed): {n['ran']}/{n['refused']}/{n['flat']}/{n['failed']} of {len(cells)}; "
          f"ran {100 * n['ran'] / max(1, len(cells)):.1f}%; wall {wall:.0f}s")
    reasons = Counter(c["reason"].split(";")[0][:120] for c in cells if c["status"] == "refused")
    if reasons:
        print("\nrefusals:")
        for reason, k in reasons.most_common():
            print(f"- {k} x {reason}")
    if axiom_rows:
        print("\n| model | f(x)-f(0) | IG completeness (256 steps) | DeepLift summation |\n|---|---|---|---|")
        for r in axiom_rows:
            fmt2 = [f"{v:.2e}" if isinstance(v, float) else str(v) for v in
                    (r["captum.IntegratedGradients"], r["captum.DeepLift"])]
            print(f"| {r['model']} | {r['f(x)-f(0)']:.4g} | {fmt2[0]} | {fmt2[1]} |")
    predictions = []
    if args.check is not None:
        import tempfile

        sample = args.check or [m for m in CHECK_SAMPLE if m in args.models]
        with tempfile.TemporaryDirectory() as tmp:
            for name in sample:
                predictions += check_predictions(zoo[name](), specs, cells, Path(tmp))
        agree = Counter((p["predicted"], "refused" if p["run"] == "refused" else "ran" if p["run"] in ("ran", "flat")
                         else "failed") for p in predictions)
        print(f"\n`esegeta check` on {len(predictions)} cells of {', '.join(sample)} (predicted → run):")
        for (predicted, run), k in sorted(agree.items()):
            print(f"- {predicted} → {run}: {k}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cells": cells, "axioms": axiom_rows, "check": predictions}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
