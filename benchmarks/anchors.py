"""Seconds per method through esegeta beside TorchCAM's and MONAI's own calls (the overhead ratio).

On the 2D retina and 3D tissue samples (tests/conftest.py, their wrappers), every ``torchcam.*``
and ``monai.*`` method that explains a segmenter runs ``--repeat`` times through
:func:`esegeta.explain` and as its library's README calls it on an equivalent model (the
sample's model followed by the wrapper's activation and region score, masks frozen on the
unperturbed input: the same map, tests/test_torchcam.py and tests/test_monai.py); the
classifier-only ones (CAM, FinerCAM, MONAI's GradCAMpp) on the digits classifier; the median of
each is reported after one warm-up call. Sampling methods run with ``SAMPLES`` noisy samples on
both sides (upstream's defaults, 25–35, multiply both by the same factor). LeGrad needs a ViT:
not timed here.

    python benchmarks/anchors.py [--repeat 5]     # markdown table on stdout
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def region_model(case) -> nn.Module:
    """The case's model with its wrapper's activation and region score: column k = sum(act_k · M_k)
    (a classifier as it is, under the same ``model.`` prefix)."""
    with torch.no_grad():
        out = case.model(case.x)
    if case.wrapper is None:
        masks = None

        def act(o):
            return o
    elif case.wrapper["name"] == "threshold":
        p = torch.sigmoid(out[:, 0:1])
        masks = torch.cat([p <= 0.5, p > 0.5], 1).float()

        def act(o):
            return torch.sigmoid(o[:, 0:1])
    else:
        masks = torch.stack([out[0].argmax(0) == k for k in range(out.shape[1])])[None].float()

        def act(o):
            return torch.softmax(o, 1)

    class Region(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = copy.deepcopy(case.model)

        def forward(self, x):
            return act(self.model(x)) if masks is None else (act(self.model(x)) * masks).flatten(2).sum(-1)

    return Region().eval()


#: Noisy samples per call of the sampling methods (both sides).
SAMPLES = 4
#: esegeta's params per method (the direct call gets the same, under the same upstream names).
PARAMS = {"torchcam.SSCAM": {"num_samples": SAMPLES}, "torchcam.ISCAM": {"num_samples": SAMPLES},
          "torchcam.SmoothGradCAMpp": {"num_samples": SAMPLES}, "monai.SmoothGrad": {"n_samples": SAMPLES},
          "monai.GuidedBackpropSmoothGrad": {"n_samples": SAMPLES}}


def _layers(case, method: str):
    """The layer(s) of ``case`` a method explains: two to fuse for RefineCAM."""
    return list(case.fused_layers) if method.endswith("RefineCAM") else case.layer


def torchcam_direct(name: str):
    def call(case, model):
        import torchcam.methods

        layers = _layers(case, name)
        layer = [f"model.{n}" for n in layers] if isinstance(layers, list) else f"model.{layers}"
        with getattr(torchcam.methods, name)(model, layer, **PARAMS.get(f"torchcam.{name}", {})) as extractor:
            scores = model(case.x)
            return extractor(class_idx=case.target, scores=scores)[0]
    return call


def monai_direct(name: str):
    def call(case, model):
        import monai.visualize as mv

        cls = getattr(mv, name)
        if name in ("GradCAM", "GradCAMpp"):
            return cls(nn_module=model, target_layers=f"model.{case.layer}")(case.x, class_idx=case.target)
        if name == "CAM":
            return cls(nn_module=model, target_layers=f"model.{case.layer}",
                       fc_layers=lambda m: m.model.fc)(case.x, class_idx=[case.target])
        if name == "OcclusionSensitivity":
            return cls(nn_module=model, verbose=False)(case.x)[0]
        return cls(model, **PARAMS.get(f"monai.{name}", {}), **({"verbose": False} if "Smooth" in name else {}))(
            case.x.clone(), index=case.target)
    return call


#: (method id, needs the layer, the direct call): every torchcam/monai method but LeGrad (a ViT's)
METHODS = tuple(
    [(f"torchcam.{n}", True, torchcam_direct(n)) for n in (
        "CAM", "GradCAM", "GradCAMpp", "XGradCAM", "LayerCAM", "FinerCAM", "RefineCAM", "SmoothGradCAMpp",
        "ScoreCAM", "SSCAM", "ISCAM")]
    + [(f"monai.{n}", n in ("CAM", "GradCAM", "GradCAMpp"), monai_direct(n)) for n in (
        "CAM", "GradCAM", "GradCAMpp", "VanillaGrad", "SmoothGrad", "GuidedBackpropGrad", "GuidedBackpropSmoothGrad",
        "OcclusionSensitivity")]
)


def _median(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    import esegeta
    from conftest import digits_case, retina_case, tissue_case
    from esegeta.spec import registry

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| method | sample | esegeta s | upstream s | ratio |")
    print("|---|---|---|---|---|")
    for case in (digits_case(), retina_case(), tissue_case()):
        model = region_model(case)
        for method, layer, direct in METHODS:
            if case.task not in registry.get(method).tasks or ("segmentation" in registry.get(method).tasks) == (
                    case.wrapper is None):  # segmenter methods on the segmenters, classifier-only ones on digits
                continue
            ours = _median(lambda c=case, m=method, l=layer: esegeta.explain(  # noqa: E741
                c.model, c.x, m, target=c.target, wrapper=c.wrapper, layer=_layers(c, m) if l else None,
                **PARAMS.get(m, {})), args.repeat)
            theirs = _median(lambda c=case, d=direct, net=model: d(c, net), args.repeat)
            print(f"| {method} | {case.name} {tuple(case.x.shape[2:])} | {ours:.4f} | {theirs:.4f} | "
                  f"{ours / theirs:.2f} |", flush=True)


if __name__ == "__main__":
    main()
