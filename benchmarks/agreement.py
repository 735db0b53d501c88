"""The same method in several libraries: how well do their results agree?

Each family below is one method as several libraries implement it, with the parameters
that make them compute the same thing (Captum's Saliency returns |gradient| unless
``abs=False``; Grad-CAMs at a layer's resolution are upsampled to the input's). Every
member runs through :func:`esegeta.explain` on the sample models (tests/conftest.py), its
result is summed over channels and resampled to a common grid, and the Pearson correlation
of each member with the family's first is reported.

    python benchmarks/agreement.py            # markdown table on stdout

tests/test_agreement.py checks every correlation against the family's floor.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@dataclass(frozen=True)
class Member:
    """One library's version of the method: id, params, and whether it needs the case's layer."""

    method: str
    params: dict = field(default_factory=dict)
    layer: bool = False
    fuse: bool = False  # the case's two layers, fused (the RefineCAMs)
    trace: str | None = None  # compare this entry of the zennit trace instead of the input map
    negate: bool = False  # the library maps high to low (MONAI's default_normalizer; occlusion's occluded score)


@dataclass(frozen=True)
class Family:
    """One method in several libraries; ``floor`` is the lowest correlation the test accepts."""

    name: str
    members: tuple[Member, ...]
    cases: tuple[str, ...]
    floor: float
    note: str = ""
    reduce: str = "sum"  # over channels: "sum", or "absmax" (TorchRay's gradient_to_saliency: max of |.|)


_ALL = ("digits", "retina2d", "tissue3d")
_2D = ("digits", "retina2d")
_EPS_MAP = {"layer_map": {"Activation": "pass", "types.Linear": {"rule": "epsilon", "epsilon": 1e-9},
                          "AvgPool": {"rule": "epsilon", "epsilon": 1e-9},
                          "BatchNorm": {"rule": "epsilon", "epsilon": 1e-9}}, "canonizers": []}

_ABSMAX = "TorchRay returns max over channels of |gradient|: every member reduced the same way"
FAMILIES = (
    Family("gradient", (Member("captum.Saliency", {"abs": False}), Member("torchray.gradient"),
                        Member("zennit.Gradient")), _ALL, 0.999, _ABSMAX, "absmax"),
    Family("guided backprop", (Member("captum.GuidedBackprop"), Member("torchray.guided_backprop"),
                               Member("zennit.GuidedBackprop")), _ALL, 0.999, _ABSMAX, "absmax"),
    Family("deconvnet", (Member("captum.Deconvolution"), Member("torchray.deconvnet"),
                         Member("zennit.DeconvNet")), _ALL, 0.999, _ABSMAX, "absmax"),
    Family("Grad-CAM", (Member("captum.LayerGradCam", {"relu_attributions": True}, layer=True),
                        Member("torchray.grad_cam", layer=True), Member("gradcam.GradCAM", layer=True),
                        Member("torchcam.GradCAM", layer=True), Member("monai.GradCAM", layer=True, negate=True)),
           _ALL, 0.9, "layer maps upsampled to the input (bilinear); pytorch-grad-cam, torchcam and MONAI also min-max "
                      "scale, MONAI to (max, min) → (0, 1): negated"),
    Family("RefineCAM", (Member("gradcam.RefineCAM", {"base_method": "GradCAM"}, fuse=True),
                         Member("torchcam.RefineCAM", {"base_method": "GradCAM"}, fuse=True)), _ALL, 0.95,
           "the Grad-CAMs of two layers, each scaled to [0, 1], multiplied on the finer grid (their default bases, "
           "the two libraries' Grad-CAM++, weigh gradients differently: r 0.01-0.90)"),
    Family("occlusion", (Member("captum.Occlusion", {"sliding_window_shapes": lambda x: [x.shape[1]] + [4] * (x.ndim - 2),
                                                     "strides": lambda x: [x.shape[1]] + [4] * (x.ndim - 2)}),
                         Member("zennit.Occlusion", {"window": 4, "stride": 4}),
                         Member("monai.OcclusionSensitivity", {"mask_size": 4, "overlap": 0.0, "mode": 0.0,
                                                               "activate": False}, negate=True)),
           _ALL, 0.4, "a zero window of 4 per axis, stride 4; Captum: f(x) - f(occluded) per window, MONAI: "
                      "f(occluded) (negated), zennit: its own occluded-score convention"),
    Family("LRP-epsilon", (Member("captum.LRP"), Member("zennit.LayerMapComposite", _EPS_MAP)), _ALL, 0.5,
           "no rule for the functional residual '+' or torch.cat in either library"),
    Family("excitation backprop", (Member("torchray.excitation_backprop", layer=True),
                                   Member("zennit.ExcitationBackprop", {"trace": True}, trace="pool")),
           ("digits",), 0.5, "relevance at the output of layer2 (zennit: the input of the next layer, pool)"),
    Family("integrated gradients", (Member("captum.IntegratedGradients", {"n_steps": 64}),
                                    Member("zennit.IntegratedGradients", {"n_iter": 64})), _ALL, 0.99),
    Family("expected gradients / GradientSHAP",
           (Member("captum.GradientShap", {"baselines": "zeros", "n_samples": 64, "stdevs": 0.0}),
            Member("shap.GradientExplainer", {"data": "zeros", "nsamples": 64})), _2D, 0.95,
           "zero background: both are IG with random interpolation points"),
    Family("DeepLIFT / DeepSHAP", (Member("captum.DeepLiftShap", {"baselines": ["zeros", "blur"]}),
                                   Member("shap.DeepExplainer", {"data": ["zeros", "blur"]})), ("digits",), 0.95,
           "the same two baselines (zeros and a blurred input)"),
)


def _case(name: str):
    from conftest import CASES

    return CASES[name]()


def _map(member: Member, case) -> torch.Tensor:
    import esegeta

    torch.manual_seed(0)
    np.random.seed(0)
    layer = list(case.fused_layers) if member.fuse else case.layer if member.layer else None
    target = case.target
    if member.trace is not None:
        from esegeta.attribution.explainer import run
        from esegeta.attribution.prepare import prepared
        from esegeta.spec.request import from_arguments

        x = case.x.float()
        request = from_arguments(member.method, target=target, wrapper=case.wrapper, params=member.params)
        extras = run(request, prepared(case.model, x), x, samples=x).extras
        return extras["trace"][member.trace].detach().float()
    params = {k: v(case.x) if callable(v) else v for k, v in member.params.items()}
    result = esegeta.explain(case.model, case.x, member.method, target=target, wrapper=case.wrapper, layer=layer,
                             **params)
    return -result if member.negate else result


def _common(a: torch.Tensor, shape: torch.Size, reduce: str) -> torch.Tensor:
    a = a.abs().amax(dim=1, keepdim=True) if reduce == "absmax" else a.sum(dim=1, keepdim=True)
    if a.shape[2:] != shape:
        mode = "bilinear" if a.ndim == 4 else "trilinear"
        a = F.interpolate(a, size=tuple(shape), mode=mode, align_corners=False)
    return a.flatten()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def correlations(family: Family, case_name: str) -> list[tuple[str, str, float]]:
    """(first member, other member, Pearson r) for each other member that supports the case."""
    from esegeta.spec import registry

    case = _case(case_name)
    members = [m for m in family.members if case.dims in registry.get(m.method).dims]
    maps = {m.method: _map(m, case) for m in members}
    shape = max((m.shape[2:] for m in maps.values()), key=lambda s: int(np.prod(s)))
    flat = {k: _common(v, shape, family.reduce) for k, v in maps.items()}
    first = members[0].method
    return [(first, m.method, pearson(flat[first], flat[m.method])) for m in members[1:]]


def main() -> None:
    print("| method | case | reference | other library | Pearson r |")
    print("|---|---|---|---|---|")
    for family in FAMILIES:
        for case_name in family.cases:
            for ref, other, r in correlations(family, case_name):
                print(f"| {family.name} | {case_name} | {ref} | {other} | {r:.4f} |", flush=True)


if __name__ == "__main__":
    main()
