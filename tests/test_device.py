"""The meta-device lane: esegeta's own code is device-correct, proven without a GPU.

On torch's ``meta`` device tensors have shapes but no values, and an operation that mixes a
CPU tensor with a meta tensor raises as it would with a CUDA tensor (0-dim CPU tensors mix
with both, as on CUDA). So every code path that stays inside torch runs here with model and
input on ``meta``: a tensor esegeta made on the CPU (a buffer, a mask, a window, a
baseline) breaks the run. Each wrapped case failed before the wrapper's buffers followed the
masks' device (``index is on cpu (index_select)``); nothing here computes a value, so the
lane takes seconds.

Left out, for reasons outside esegeta (upstream reads values or works in numpy):
- grad-cam (every CAM): its ``BaseCAM`` turns activations and gradients into numpy;
- SHAP, LIME (both libraries), torchray ``rise`` and ``extremal_perturbation``: numpy
  model functions, or ``.item()``/copies to the CPU upstream;
- captum ``FeatureAblation``/``LayerFeatureAblation`` (``torch.unique``: no meta kernel),
  ``ShapleyValueSampling``, ``KernelShap``, ``Lime`` (``.item()`` upstream);
- lucent ``render_vis``: lucent puts its images on its own device (CPU or cuda:0);
- the ``otsu`` threshold, the ``blur`` baselines, ``esegeta.CAM``'s check of its GAP→linear
  head and PatternNet/PatternAttribution's overflow check read values (their fitting is
  tested on meta below);
- torchcam ``GradCAMpp``: its alpha is divided in place through a boolean mask (``nonzero``: no
  meta kernel); ``RefineCAM`` runs Grad-CAM++ by default (it runs here with ``LayerCAM``);
- MONAI ``CAM``, ``GradCAM``, ``GradCAMpp``: their ``default_normalizer`` goes through numpy on the
  CPU; ``SmoothGrad``, ``GuidedBackpropSmoothGrad``: the noise's spread is ``(x.max() - x.min()).item()``;
  ``OcclusionSensitivity``: its Gaussian occluder's kernel size is read with ``float(sigma)``;
- ``esegeta.GuidedIG`` and ``esegeta.XRAI`` are steered by values (Guided IG: the L1 distance
  left and a quantile of |gradient| choose the features to move; XRAI: scikit-image's
  segmentation of the input and a greedy choice of regions by their gain); XRAI's integrated
  gradients, the part made of tensors, run on meta below.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable

import pytest
import torch

import esegeta
from esegeta.spec import registry
from esegeta.attribution import wrappers
from esegeta.algorithms import patterns
from esegeta.attribution.baselines import grid_mask, named_baseline
from esegeta.attribution.patcher import Blend, Grid, Stitched

from conftest import CASES, Case

META = torch.device("meta")


@pytest.fixture(scope="module", params=list(CASES))
def meta_case(request) -> Case:
    """A sample case with a deep copy of its model and its input on ``meta``."""
    case = CASES[request.param]()
    model = copy.deepcopy(case.model).to(META)
    return dataclasses.replace(case, model=model, x=case.x.to(META))


def _explain(case: Case, method: str, target=None, **kw) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
        warnings.filterwarnings("ignore", message="Setting forward, backward hooks and attributes")
        attr = esegeta.explain(case.model, case.x, method, case.target if target is None else target,
                               wrapper=kw.pop("wrapper", case.wrapper), **kw)
    assert attr.device == case.x.device, "explain returns its result on the input's device"
    return attr


def _baselines(x: torch.Tensor) -> torch.Tensor:
    """A baseline distribution of two inputs, as a tensor on the input's device."""
    return torch.cat([torch.zeros_like(x), torch.full_like(x, 0.5)])


def _neuron(case: Case) -> list[int]:
    return [0] * (case.x.ndim - 1)  # (channel, *spatial) of the layer output: any neuron has a gradient graph


#: method id → its params for a case, over the spec's quick params. Layer methods get the case's layer.
METHODS: dict[str, Callable[[Case], dict]] = {
    "captum.Saliency": lambda c: {},
    "captum.InputXGradient": lambda c: {},
    "captum.IntegratedGradients": lambda c: {"n_steps": 4},
    "captum.DeepLift": lambda c: {},
    "captum.DeepLiftShap": lambda c: {"baselines": _baselines(c.x)},
    "captum.GradientShap": lambda c: {"baselines": _baselines(c.x), "n_samples": 3},
    "captum.GuidedBackprop": lambda c: {},
    "captum.Deconvolution": lambda c: {},
    "captum.GuidedGradCam": lambda c: {},
    "captum.Occlusion": lambda c: {"sliding_window_shapes": [c.x.shape[1]] + [4] * (c.x.ndim - 2),
                                   "strides": [c.x.shape[1]] + [4] * (c.x.ndim - 2)},
    "captum.LRP": lambda c: {},
    "captum.LayerActivation": lambda c: {},
    "captum.LayerConductance": lambda c: {"n_steps": 4},
    "captum.LayerGradCam": lambda c: {},
    "captum.LayerGradientShap": lambda c: {"baselines": _baselines(c.x), "n_samples": 3},
    "captum.LayerGradientXActivation": lambda c: {},
    "captum.LayerDeepLift": lambda c: {},
    "captum.LayerDeepLiftShap": lambda c: {"baselines": _baselines(c.x)},
    "captum.LayerIntegratedGradients": lambda c: {"n_steps": 4},
    "captum.LayerLRP": lambda c: {},
    "captum.InternalInfluence": lambda c: {"n_steps": 4},
    "captum.NeuronGradient": lambda c: {"neuron_selector": _neuron(c)},
    "captum.NeuronIntegratedGradients": lambda c: {"neuron_selector": _neuron(c), "n_steps": 4},
    "captum.NeuronGuidedBackprop": lambda c: {"neuron_selector": _neuron(c)},
    "captum.NeuronDeepLift": lambda c: {"neuron_selector": _neuron(c)},
    "captum.NeuronGradientShap": lambda c: {"neuron_selector": _neuron(c), "baselines": _baselines(c.x)},
    "captum.NeuronConductance": lambda c: {"neuron_selector": _neuron(c), "n_steps": 4},
    "torchray.gradient": lambda c: {},
    "torchray.deconvnet": lambda c: {},
    "torchray.guided_backprop": lambda c: {},
    "torchray.grad_cam": lambda c: {},
    "torchray.linear_approx": lambda c: {},
    "torchray.excitation_backprop": lambda c: {},
    "torchray.contrastive_excitation_backprop": lambda c: {},
    "esegeta.LayerActivationGuidedBackprop": lambda c: {},
    **{f"torchcam.{name}": (lambda c: {}) for name in (
        "CAM", "ScoreCAM", "SSCAM", "ISCAM", "GradCAM", "SmoothGradCAMpp", "XGradCAM", "LayerCAM", "FinerCAM")},
    "torchcam.RefineCAM": lambda c: {"base_method": "LayerCAM"},
    "monai.VanillaGrad": lambda c: {},
    "monai.GuidedBackpropGrad": lambda c: {},
    "esegeta.BlurIG": lambda c: {"steps": 2, "max_sigma": 1},
    "esegeta.CRP": lambda c: {"conditions": {c.layer: [0, 1]}, "record_layers": [c.layer], "top_k": 2},
    **{f"zennit.{name}": (lambda c: {}) for name in (
        "EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1", "EpsilonAlpha2Beta1Flat", "EpsilonGammaBox",
        "ExcitationBackprop", "GuidedBackprop", "DeconvNet", "LayerMapComposite", "SpecialFirstLayerMapComposite",
        "NameLayerMapComposite", "Gradient", "SmoothGrad", "IntegratedGradients", "Occlusion")},
}


@pytest.mark.parametrize("method_id", sorted(METHODS))
def test_method_runs_on_meta(method_id, meta_case):
    spec = registry.get(method_id)
    if meta_case.dims not in spec.dims:
        pytest.skip(f"{method_id} does not support {meta_case.dims}D")
    if meta_case.task not in spec.tasks:
        pytest.skip(f"{method_id} does not apply to {meta_case.task} models")
    layer = meta_case.layer_for(spec)
    quick = {k: (v(meta_case.x) if callable(v) else v) for k, v in spec.quick_params.items()}
    params = {**quick, **METHODS[method_id](meta_case)}
    attr = _explain(meta_case, method_id, layer=layer, **params)
    assert attr.shape[0] == meta_case.x.shape[0]


@pytest.mark.parametrize("nt_type", ["smoothgrad", "vargrad"])
@pytest.mark.parametrize("method_id", ["captum.Saliency", "captum.IntegratedGradients"])
def test_noise_tunnel_on_meta(method_id, nt_type, meta_case):
    params = {"n_steps": 4} if method_id == "captum.IntegratedGradients" else {}
    attr = _explain(meta_case, method_id, noise_tunnel={"nt_type": nt_type, "nt_samples": 3, "stdevs": 0.1},
                    **params)
    assert attr.shape == meta_case.x.shape


def test_layer_noise_tunnel_on_meta(meta_case):
    _explain(meta_case, "captum.LayerGradCam", layer=meta_case.layer,
             noise_tunnel={"nt_type": "smoothgrad", "nt_samples": 3})


def test_named_baselines_and_grid_masks_on_meta(meta_case):
    x = meta_case.x
    for name in ("zeros", "mean", "min"):
        assert named_baseline(name, x, "b").device == META
    _explain(meta_case, "captum.IntegratedGradients", baselines="mean", n_steps=4)
    _explain(meta_case, "captum.GradientShap", baselines=["zeros", 0.5], n_samples=2)
    mask = grid_mask([2] * (x.ndim - 2), x, "m")
    assert mask.device == META and mask.shape == (1, 1, *x.shape[2:])


def test_legrad_on_a_vit_on_meta():
    """torchcam's LeGrad projects a torchvision ViT block's tokens with the model's own head."""
    from test_torchcam import _vit

    model = _vit().to(META)
    x = torch.empty(2, 3, 32, 32, device=META)
    attr = esegeta.explain(model, x, "torchcam.LeGrad", target=1, layer="encoder.layers.encoder_layer_1")
    assert attr.device == META and attr.shape == (2, 1, 4, 4)


def test_xrai_integrated_gradients_on_meta(meta_case):
    """XRAI's integrated gradients from a black and a white baseline: tensors on the data's device."""
    from esegeta.algorithms import xrai
    from esegeta.attribution.prepare import prepared

    forward = prepared(meta_case.model, meta_case.x)
    if meta_case.wrapper is not None:
        forward = wrappers.build(forward, meta_case.x, meta_case.wrapper)
    one = meta_case.x[0]
    attr = xrai.integrated_gradients(forward, one, torch.zeros_like(one), 1, steps=3, batch_size=2)
    assert attr.device == META and attr.shape == one.shape


# -- targets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("target, method_id", [("index", "captum.Saliency"), ("index", "zennit.Gradient"),
                                               ("predicted", "zennit.Gradient"), ("predicted", "zennit.EpsilonPlus")])
def test_targets_on_meta(target, method_id, meta_case):
    """A class index, or "predicted": the argmax per input, a tensor on the data's device. (Captum
    reads a one-element target tensor with ``.item()``, TorchRay takes Python ints: on meta,
    "predicted" for one input goes to Zennit, whose seed esegeta builds on the output's device.)"""
    from esegeta.attribution.call import resolve_target
    from esegeta.attribution.prepare import prepared

    if target == "predicted":
        forward = prepared(meta_case.model, meta_case.x)
        if meta_case.wrapper is not None:
            forward = wrappers.build(forward, meta_case.x, meta_case.wrapper)
        assert resolve_target(forward, meta_case.x, "predicted").device == META
    layer = meta_case.layer if registry.get(method_id).needs_layer else None
    wanted = meta_case.target if target == "index" else "predicted"
    assert _explain(meta_case, method_id, target=wanted, layer=layer).shape[0] == 1


def test_batch_with_predicted_target_on_meta(meta_case):
    """A batch of two, one predicted class each (a wrapper explains input by input)."""
    case = dataclasses.replace(meta_case, x=meta_case.x.expand(2, *meta_case.x.shape[1:]))
    method = "captum.IntegratedGradients" if case.wrapper is None else "zennit.IntegratedGradients"
    assert _explain(case, method, target="predicted").shape[0] == 2


# -- wrappers of every kind ------------------------------------------------------------------------

def _wrapped_cases() -> list[str]:
    return [name for name, make in CASES.items() if name != "digits"]


@pytest.fixture(scope="module", params=_wrapped_cases())
def segmenter(request) -> Case:
    case = CASES[request.param]()
    return dataclasses.replace(case, model=copy.deepcopy(case.model).to(META), x=case.x.to(META), target=1)


WRAPPERS = {
    "threshold": {"name": "threshold", "channel": 0, "threshold": 0.5, "activation": "sigmoid"},
    "threshold-mean": {"name": "threshold", "channel": 0, "threshold": 0.3, "reduction": "mean"},
    "multiclass": {"name": "multiclass", "activation": "softmax"},
    "multiclass-mean": {"name": "multiclass", "activation": "softmax", "reduction": "mean"},
}


def _assert_on_meta(wrapped: wrappers.WrappedModel) -> None:
    buffers = dict(wrapped.score.named_buffers())
    assert set(buffers) == {"channels", "reduce.masks"}  # the masks live in the MaskSum leaf (an LRP rule)
    assert all(b.device == META for b in buffers.values()), {n: b.device for n, b in buffers.items()}
    assert wrapped.unperturbed.device == META


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_wrapper_on_meta(kind, segmenter):
    _assert_on_meta(wrappers.build(segmenter.model, segmenter.x, WRAPPERS[kind]))
    _explain(segmenter, "captum.Saliency", target=0, wrapper=WRAPPERS[kind])  # column 0 exists for every kind


@pytest.mark.parametrize("mask_device", ["cpu", "meta"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_region_wrapper_with_a_mask_tensor_on_meta(mask_device, reduction, segmenter):
    """A region mask given as a tensor (Python only: configs name files), wherever it lives, is
    used on the data's device."""
    from esegeta.attribution.explainer import run
    from esegeta.attribution.prepare import prepared
    from esegeta.spec.request import from_arguments

    mask = torch.zeros(segmenter.x.shape[2:], device=mask_device)
    wrapper = {"name": "region", "mask": mask, "activation": "sigmoid", "reduction": reduction}
    _assert_on_meta(wrappers.build(segmenter.model, segmenter.x, wrapper))
    model = prepared(segmenter.model, segmenter.x)
    request = from_arguments("captum.IntegratedGradients", target=0, wrapper=wrapper, params={"n_steps": 4})
    attr = run(request, model, segmenter.x).result
    assert attr.device == META


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_region_wrapper_with_a_mask_file_on_meta(reduction, segmenter, tmp_path):
    import numpy as np

    np.save(tmp_path / "mask.npy", np.ones(tuple(segmenter.x.shape[2:]), dtype=np.uint8))
    wrapper = {"name": "region", "mask": str(tmp_path / "mask.npy"), "reduction": reduction}
    _assert_on_meta(wrappers.build(segmenter.model, segmenter.x, wrapper))
    _explain(segmenter, "captum.Saliency", target=0, wrapper=wrapper)


def test_otsu_threshold_needs_values(segmenter):
    pytest.skip("otsu computes the threshold from the output's values (scikit-image, on the CPU): CPU-only")


# -- the patcher -----------------------------------------------------------------------------------

def _patch(case: Case, mode: str, blend: str) -> dict:
    """Four (2D) or eight (3D) overlapping patches, two per batch."""
    size, overlap = ([32, 32], [16, 16]) if case.dims == 2 else ([12, 16, 10], [4, 8, 4])
    return {"size": size, "overlap": overlap, "mode": mode, "blend": blend, "batch_size": 2}


@pytest.mark.parametrize("blend", ["average", "hann"])
@pytest.mark.parametrize("mode", ["local", "global"])
@pytest.mark.parametrize("method_id", ["captum.Saliency", "captum.IntegratedGradients", "captum.DeepLift"])
def test_patcher_on_meta(method_id, mode, blend, segmenter):
    """Sampling (slices of the input where it lives), stitching and blending on the data's device."""
    params = {"n_steps": 2} if method_id == "captum.IntegratedGradients" else {}
    attr = _explain(segmenter, method_id, patch=_patch(segmenter, mode, blend), **params)
    assert attr.shape == segmenter.x.shape


def test_patcher_local_layer_results_and_region_mask_on_meta(segmenter):
    """Results at a layer's resolution are blended on its grid; a CPU region mask is cropped per patch."""
    from esegeta.attribution.explainer import run
    from esegeta.attribution.prepare import prepared
    from esegeta.spec.request import from_arguments

    layer_attr = _explain(segmenter, "captum.LayerGradCam", layer=segmenter.layer,
                          patch=_patch(segmenter, "local", "hann"))
    assert layer_attr.device == META
    region = {"name": "region", "mask": torch.ones(segmenter.x.shape[2:]), "activation": "sigmoid"}
    request = from_arguments("captum.Saliency", target=0, wrapper=region, patch=_patch(segmenter, "local", "average"))
    attr = run(request, prepared(segmenter.model, segmenter.x), segmenter.x).result
    assert attr.device == META


@pytest.mark.parametrize("blend", ["average", "hann"])
def test_patcher_parts_are_made_on_the_data_device(blend, segmenter):
    x = segmenter.x
    grid = Grid.over(tuple(x.shape[2:]), _patch(segmenter, "local", blend)["size"],
                     _patch(segmenter, "local", blend)["overlap"], blend)
    assert grid.window(device=META).device == META
    stitched = Stitched(segmenter.model, grid, segmenter.dims, 2)
    window, total = stitched.weights(META)
    assert window.device == total.device == META
    assert stitched.assemble(x).device == META
    results = torch.zeros(len(grid.locations), 2, *grid.size, device=META)
    blend_ = Blend(grid, (1, 1, 1), results)
    blend_.add(results, grid.locations)
    assert blend_.output().device == META


# -- patterns: fitted on the data's device, in fp32, cached per device and precision -------------------

def test_patterns_fit_on_meta(meta_case):
    network, x = meta_case.model, meta_case.x
    found = patterns.kernels(network, x, "esegeta.PatternNet")
    fitted = patterns.fit(network, found, iter([x, x]), "relu")
    assert {t.device for t in fitted.values()} == {META}


def test_patterns_fit_in_fp32_under_autocast_and_cache_per_precision(digits):
    """A run under ``amp`` fits the same patterns as one in fp32 (fitting runs autocast off), and
    the cache keeps them apart: an fp16/bf16 attempt's entry is never its fp32 retry's."""
    from esegeta.attribution.prepare import prepared

    samples = torch.cat([digits.x, digits.x.flip(-1), digits.x.flip(-2), digits.x.transpose(-1, -2)])
    network = prepared(digits.model, digits.x)
    found = patterns.kernels(network, digits.x, "esegeta.PatternNet")
    plain = patterns.fit(network, found, iter([samples]), "relu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert patterns.precision(network, digits.x.device) == "autocast:bfloat16"
        under_amp = patterns.fit(network, found, iter([samples]), "relu")
    for name in plain:
        assert torch.equal(plain[name], under_amp[name]), name
    patterns._fitted.pop(network, None)
    esegeta.explain(digits.model, digits.x, "esegeta.PatternNet", 3, fit_inputs=samples)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        esegeta.explain(digits.model, digits.x, "esegeta.PatternNet", 3, fit_inputs=samples)
    keys = [key for ref, key, _ in patterns._fitted[network] if ref() is samples]
    assert keys == [("relu", "cpu", "float32"), ("relu", "cpu", "autocast:bfloat16")]
