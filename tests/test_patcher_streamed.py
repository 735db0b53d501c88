"""Global patch mode's streamed methods (issue 22): esegeta's own window-by-window Integrated
Gradients, Saliency, InputXGradient, SmoothGrad, Occlusion and DeepLIFT equal Captum's call on the
whole stitched model."""
from __future__ import annotations

import pytest
import torch
from captum.attr import DeepLift, InputXGradient, IntegratedGradients, NoiseTunnel, Occlusion, Saliency

import esegeta
from esegeta.attribution.patcher import Grid, Stitched
from esegeta.attribution.rules import PairedSoftmax
from esegeta.spec.request import wrapper_config

from conftest import no_streamed_fallback, pointwise_whole_and_streamed, tissue_case

#: patches that tile the 16×16×8 crop (separable: the score is a sum over patches), and overlapping ones
TILED = {"size": [8, 8, 8], "overlap": [0, 0, 0], "mode": "global", "batch_size": 2}
OVERLAPPING = {"size": [8, 8, 6], "overlap": [4, 4, 2], "mode": "global", "blend": "hann", "batch_size": 3}
SIGMOID_MEAN = {"name": "threshold", "channel": 1, "activation": "sigmoid", "reduction": "mean", "threshold": 0.3}


def _exact_softmax(wrapped, cls):
    """For DeepLift, the wrapper's softmax as esegeta runs it (:class:`PairedSoftmax`: the exact
    multiplier, where Captum's own ``nn.Softmax`` rule is approximate; tests/test_wrapper_softmax.py)."""
    activation = wrapped.score.activation
    if cls is DeepLift and type(activation) is torch.nn.Softmax:
        wrapped.score.activation = PairedSoftmax(activation.dim)
    return wrapped


def _captum(model, x, wrapper, patch, cls, target, **kw):
    """Captum's own call on the stitched prediction's wrapped score (the whole volume at once)."""
    grid = Grid.over(tuple(x.shape[2:]), patch["size"], patch["overlap"], patch.get("blend", "average"))
    wrapped = _exact_softmax(Stitched.build_wrapper(Stitched(model, grid, 3, 4), x, wrapper_config(wrapper)), cls)
    nt = kw.pop("noise_tunnel", None)
    explainer = cls(wrapped)
    if nt is not None:
        return NoiseTunnel(explainer).attribute(x, target=target, nt_samples_batch_size=1, **nt, **kw).detach()
    return explainer.attribute(x, target=target, **kw).detach()


CASES = [
    ("captum.IntegratedGradients", IntegratedGradients, {"n_steps": 8, "internal_batch_size": 4}),
    ("captum.IntegratedGradients", IntegratedGradients, {"n_steps": 5, "method": "riemann_trapezoid",
                                                         "baselines": 0.5}),
    ("captum.Saliency", Saliency, {}),
    ("captum.Saliency", Saliency, {"abs": False}),
    ("captum.InputXGradient", InputXGradient, {}),
    ("captum.Saliency", Saliency, {"noise_tunnel": {"nt_type": "smoothgrad", "nt_samples": 3, "stdevs": 0.2}}),
    ("captum.InputXGradient", InputXGradient, {"noise_tunnel": {"nt_type": "smoothgrad_sq", "nt_samples": 2,
                                                                "stdevs": 0.2}}),
    # blocks straddling patches and clipped at the border, a tensor baseline (overlapping patches: Captum's)
    ("captum.Occlusion", Occlusion, {"sliding_window_shapes": (1, 6, 5, 3), "strides": (1, 5, 4, 3),
                                     "baselines": torch.linspace(-1, 1, 16 * 16 * 8).reshape(1, 1, 16, 16, 8),
                                     "perturbations_per_eval": 3}),
    ("captum.DeepLift", DeepLift, {}),
    ("captum.DeepLift", DeepLift, {"baselines": torch.linspace(-1, 1, 16 * 16 * 8).reshape(1, 1, 16, 16, 8)}),
    ("captum.DeepLift", DeepLift, {"wrapper": SIGMOID_MEAN}),
]


def _no_fallback(monkeypatch) -> None:
    no_streamed_fallback(monkeypatch, "Captum")


@pytest.mark.parametrize("patch", [TILED, OVERLAPPING], ids=["tiled", "overlapping"])
@pytest.mark.parametrize("method, cls, kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_streamed_equals_captum_on_the_stitched_model(method, cls, kwargs, patch, monkeypatch):
    case = tissue_case((16, 16, 8))
    model, x = case.model, case.x
    kwargs = dict(kwargs)
    wrapper = kwargs.pop("wrapper", case.wrapper if "noise_tunnel" not in kwargs else SIGMOID_MEAN)
    torch.manual_seed(3)
    theirs = _captum(model, x, wrapper, patch, cls, 2 if wrapper is case.wrapper else 1,
                     **{k: v for k, v in kwargs.items() if k not in ("internal_batch_size", "perturbations_per_eval")})
    if patch is TILED or method != "captum.Occlusion":  # the streamed path ran: Captum is not called
        _no_fallback(monkeypatch)
    torch.manual_seed(3)
    ours = esegeta.explain(model, x, method, 2 if wrapper is case.wrapper else 1, wrapper=wrapper, patch=patch,
                           **kwargs)
    assert theirs.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))


def test_streamed_integrated_gradients_complete_on_a_tensor_baseline():
    """Completeness on the stitched score with a tensor baseline (per-patch slices of it)."""
    case = tissue_case((16, 16, 8))
    model, x = case.model, case.x
    baseline = torch.full_like(x, -0.5)
    attr = esegeta.explain(model, x, "captum.IntegratedGradients", 2, wrapper=case.wrapper, patch=OVERLAPPING,
                           n_steps=64, baselines=baseline)
    grid = Grid.over(tuple(x.shape[2:]), OVERLAPPING["size"], OVERLAPPING["overlap"], "hann")
    wrapped = Stitched.build_wrapper(Stitched(model, grid, 3, 4), x, wrapper_config(case.wrapper))
    with torch.no_grad():
        delta = float(wrapped(x)[0, 2] - wrapped(baseline)[0, 2])
    assert abs(delta) > 0.1
    assert float(attr.sum()) == pytest.approx(delta, rel=0.02)


def test_streamed_falls_back_to_captum_for_what_it_does_not_cover():
    """VarGrad is Captum's (through the checkpointed stitched model); the result is still computed."""
    case = tissue_case((16, 16, 8))
    attr = esegeta.explain(case.model, case.x, "captum.Saliency", 2, wrapper=case.wrapper, patch=TILED,
                           noise_tunnel={"nt_type": "vargrad", "nt_samples": 2, "stdevs": 0.1})
    assert attr.shape == case.x.shape and torch.isfinite(attr).all()


META_CASES = [
    ("captum.IntegratedGradients", {"n_steps": 3, "internal_batch_size": 2}),
    ("captum.InputXGradient", {}),
    ("captum.Saliency", {"noise_tunnel": {"nt_type": "smoothgrad", "nt_samples": 2, "stdevs": 0.1}}),
    ("captum.Occlusion", {"sliding_window_shapes": (1, 4, 4, 4), "strides": (1, 4, 4, 4)}),
    ("captum.DeepLift", {}),
    ("captum.LRP", {}),
]


@pytest.mark.parametrize("patch", [TILED, OVERLAPPING], ids=["tiled", "overlapping"])
@pytest.mark.parametrize("method, kwargs", META_CASES, ids=[c[0] for c in META_CASES])
def test_streamed_methods_on_meta(method, kwargs, patch, monkeypatch):
    """Every tensor the streamed methods make lives on the data's device (torch's meta device here)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1))
    model = model.eval().to("meta")
    x = torch.randn(1, 1, 16, 16, 8, device="meta")
    if patch is TILED or method != "captum.Occlusion":
        _no_fallback(monkeypatch)
    for wrapper in ({"name": "multiclass", "activation": "softmax"}, SIGMOID_MEAN):
        attr = esegeta.explain(model, x, method, 1, wrapper=wrapper, patch=patch, **kwargs)
        assert attr.device == x.device and attr.shape == x.shape


@pytest.mark.parametrize("wrapper", [{"name": "multiclass", "activation": "softmax"}, SIGMOID_MEAN])
def test_tiled_masks_are_held_as_bits_and_equal_the_whole_inputs(wrapper):
    """Where patches tile the input the masks are frozen patch by patch and kept as bits; on a
    pointwise model (stitched = whole prediction) they, the record's mask and the unperturbed
    scores equal the wrapper's on the whole input."""
    from esegeta.attribution.call import frozen_mask
    from esegeta.attribution.wrappers import build

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 1), torch.nn.Tanh(), torch.nn.Conv3d(3, 3, 1)).eval()
    x = torch.randn(1, 1, 16, 16, 8)
    grid = Grid.over(tuple(x.shape[2:]), TILED["size"], TILED["overlap"], "average")
    wrapped = Stitched.build_wrapper(Stitched(model, grid, 3, 2), x, wrapper_config(wrapper))
    whole = build(model, x, wrapper)
    packed = wrapped.score.packed
    assert sum(b.numel() for b in packed.bits.values()) == whole.score.masks[0].numel() // 8
    assert torch.equal(wrapped.score.masks.float(), whole.score.masks)
    assert torch.equal(frozen_mask(wrapped, 1).float(), frozen_mask(whole, 1))
    torch.testing.assert_close(wrapped.unperturbed, whole.unperturbed, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.score(model(x)), whole.score(model(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["captum.DeepLift", "captum.GuidedBackprop"])
def test_hooking_methods_on_tiled_masks_equal_unpatched(method):
    """Methods that stay with Captum see the wrapper's activation called once per forward, masks
    held per patch (DeepLift refuses a module called twice)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1)).eval()
    x = torch.randn(1, 1, 16, 16, 8)
    wrapper = {"name": "multiclass", "activation": "softmax"}
    whole = esegeta.explain(model, x, method, 1, wrapper=wrapper)
    patched = esegeta.explain(model, x, method, 1, wrapper=wrapper, patch=TILED)
    assert whole.abs().max() > 0
    torch.testing.assert_close(patched, whole, rtol=1e-5, atol=1e-6 * float(whole.abs().max()))


@pytest.mark.parametrize("patch", [{"size": [8, 6], "overlap": [0, 0], "mode": "global", "batch_size": 2},
                                   {"size": [8, 6], "overlap": [4, 2], "mode": "global", "blend": "hann"}],
                         ids=["tiled", "overlapping"])
def test_streamed_deeplift_on_a_2d_input_with_softmax(patch, monkeypatch):
    """A 2D input (volumes of depth 1) and the wrapper's softmax (its exact multiplier, per voxel):
    equal to Captum's DeepLift on the whole stitched model with that softmax."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 3, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.Conv2d(3, 3, 1)).eval()
    x = torch.randn(1, 2, 16, 12)
    wrapper = {"name": "multiclass", "activation": "softmax"}
    grid = Grid.over(tuple(x.shape[2:]), patch["size"], patch["overlap"], patch.get("blend", "average"))
    wrapped = _exact_softmax(Stitched.build_wrapper(Stitched(model, grid, 2, 2), x, wrapper_config(wrapper)), DeepLift)
    theirs = DeepLift(wrapped).attribute(x, target=1, baselines=0.25).detach()
    _no_fallback(monkeypatch)
    ours = esegeta.explain(model, x, "captum.DeepLift", 1, wrapper=wrapper, patch=patch, baselines=0.25)
    assert theirs.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))


POINTWISE_WRAPPERS = [{"name": "multiclass", "activation": "softmax"}, SIGMOID_MEAN,
                      {"name": "multiclass", "activation": "none"}]


@pytest.mark.parametrize("patch", [TILED, OVERLAPPING], ids=["tiled", "overlapping"])
@pytest.mark.parametrize("wrapper", POINTWISE_WRAPPERS, ids=[w["activation"] for w in POINTWISE_WRAPPERS])
def test_streamed_lrp_equals_captums_on_a_pointwise_model(wrapper, patch, monkeypatch):
    """Captum's LRP refuses the stitched model (a module called once per patch): on a pointwise
    model, where the stitched prediction is the whole one, the streamed LRP (relevance shared by
    the blending weights, each patch's part Captum's LRP) equals Captum's LRP on the whole input."""
    whole, ours = pointwise_whole_and_streamed("captum.LRP", wrapper, patch, monkeypatch, "Captum")
    # ε-rule ratios at a nearly cancelling denominator amplify float32 summation order (which follows the
    # thread count and the batch shape): one voxel in 2,048 differed by 6.6e-5 of the maximum on 2 threads
    torch.testing.assert_close(ours, whole, rtol=1e-4, atol=1e-4 * float(whole.abs().max()))


@pytest.mark.parametrize("method", ["captum.LRP", "captum.DeepLift"])
def test_streamed_rule_methods_on_one_patch_equal_the_whole_input(method, monkeypatch):
    """One patch over the whole volume (the stitched prediction is the model's): the streamed path on
    a convolutional U-Net with batch norm equals the method on the unpatched input."""
    case = tissue_case((16, 16, 8))
    whole = esegeta.explain(case.model, case.x, method, 2, wrapper=case.wrapper)
    _no_fallback(monkeypatch)
    ours = esegeta.explain(case.model, case.x, method, 2, wrapper=case.wrapper,
                           patch={"size": [16, 16, 8], "mode": "global"})
    assert whole.abs().max() > 0
    torch.testing.assert_close(ours, whole, rtol=1e-4, atol=1e-5 * float(whole.abs().max()))


def test_lrp_with_a_custom_wrapper_is_refused_in_global_mode():
    """Captum's LRP cannot run on the stitched model: without a built-in wrapper (no streamed
    algorithm) global mode refuses it before anything runs, naming the reason and ``local``."""
    from esegeta.attribution.patcher import check_global
    from esegeta.errors import ConfigError
    from esegeta.spec.registry import get

    with pytest.raises(ConfigError, match="more than once.*use mode 'local'"):
        check_global(get("captum.LRP"), wrapper_config({"name": "my_wrappers.py:score"}))
    check_global(get("captum.LRP"), wrapper_config(SIGMOID_MEAN))


@pytest.mark.parametrize("patch", [TILED, OVERLAPPING], ids=["tiled", "overlapping"])
def test_zennit_lrp_in_global_mode_equals_unpatched_on_a_pointwise_model(patch):
    """An LRP composite through its library needs the wrapper's masked-sum module (its rule gives
    each voxel its share of the score): on tiling patches too the masks are frozen on the stitched
    output, so the result equals the unpatched one where the stitched prediction is the whole one
    (per-patch bit masks, whose sum is no module, gave 1,800 times the relevance)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1)).eval()
    x = torch.randn(1, 1, 16, 16, 8)
    wrapper = {"name": "multiclass", "activation": "softmax"}
    whole = esegeta.explain(model, x, "zennit.EpsilonPlus", 1, wrapper=wrapper)
    ours = esegeta.explain(model, x, "zennit.EpsilonPlus", 1, wrapper=wrapper, patch=patch)
    assert whole.abs().max() > 0
    torch.testing.assert_close(ours, whole, rtol=1e-4, atol=1e-5 * float(whole.abs().max()))
