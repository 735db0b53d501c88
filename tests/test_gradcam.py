"""pytorch-grad-cam adapter: equal to upstream called directly, segmentation targets, params, clean-up.

Conformance of every registered ``gradcam.*`` class runs in test_conformance.py.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import esegeta
from esegeta.spec import registry
from esegeta.attribution import wrappers
from esegeta.attribution.guard import run_guarded
from esegeta.compat import import_torchvision
from esegeta.spec.params import check_method
from esegeta.errors import ConfigError
from esegeta.attribution.prepare import prepared
from esegeta.spec.registry import Call

from conftest import SAMPLES, assert_unchanged, hook_count, snapshot

import_torchvision()
import pytorch_grad_cam as pgc  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget, SemanticSegmentationTarget  # noqa: E402

ATOL = 1e-6


def _direct(cls_name, model, layer, x, targets, **kwargs):
    """pytorch-grad-cam called as its README does, on a copy of the model."""
    model = copy.deepcopy(model).eval()
    cam = getattr(pgc, cls_name)(model=model, target_layers=[model.get_submodule(layer)], **kwargs)
    try:
        return torch.from_numpy(cam(input_tensor=x, targets=targets)).unsqueeze(1)
    finally:
        cam.activations_and_grads.release()


def test_every_exported_cam_class_is_registered():
    ids = {m for m in registry.all_methods() if m.startswith("gradcam.")}
    wanted = """GradCAM HiResCAM GradCAMElementWise GradCAMPlusPlus XGradCAM AblationCAM ScoreCAM EigenCAM EigenGradCAM
    LayerCAM FullGrad KPCA_CAM RandomCAM ShapleyCAM FinerCAM FEM SegEigenCAM RefineCAM SESS""".split()
    assert ids == {f"gradcam.{n}" for n in wanted}
    for name in wanted:
        assert hasattr(pgc, name)


@pytest.mark.parametrize("name", ["GradCAM", "ScoreCAM", "AblationCAM"])
def test_classifier_equals_upstream(digits, name):
    before = snapshot(digits.model)
    ours = esegeta.explain(digits.model, digits.x, f"gradcam.{name}", target=3, layer="layer2")
    theirs = _direct(name, digits.model, "layer2", digits.x, [ClassifierOutputTarget(3)])
    assert ours.shape == (1, 1, 8, 8) and ours.dtype == torch.float32
    assert torch.allclose(ours, theirs, atol=ATOL), (ours - theirs).abs().max()
    assert_unchanged(digits.model, before)


def _digits_batch():
    files = ["digit_30_label3.npy", "digit_9_label7.npy", "digit_1_label0.npy"]
    return torch.stack([torch.from_numpy(np.load(SAMPLES / "data" / "digits" / f)).float() for f in files])


def test_predicted_target_per_input_equals_upstream_argmax(digits):
    """target='predicted' gives one class per input: upstream's own default (targets=None → argmax)."""
    x = _digits_batch()
    with torch.no_grad():
        assert digits.model(x).argmax(1).unique().numel() == 3
    ours = esegeta.explain(digits.model, x, "gradcam.GradCAM", target="predicted", layer="layer2")
    theirs = _direct("GradCAM", digits.model, "layer2", x, None)
    assert torch.allclose(ours, theirs, atol=ATOL)


def test_finercam_per_input_targets_match_single_calls(digits):
    x = _digits_batch()
    batch = esegeta.explain(digits.model, x, "gradcam.FinerCAM", target="predicted", layer="layer2")
    predicted = digits.model(x).argmax(1)
    single = torch.cat([esegeta.explain(digits.model, x[i:i + 1], "gradcam.FinerCAM", target=int(predicted[i]),
                                        layer="layer2") for i in range(3)])
    assert torch.allclose(batch, single, atol=ATOL)
    assert batch.abs().sum() > 0


def _frozen_mask(model, x, activation, channel_or_argmax):
    with torch.no_grad():
        out = activation(model(x))[0]
    if channel_or_argmax == "argmax":
        return out.argmax(0)
    return out[channel_or_argmax]


@pytest.mark.parametrize("name", ["GradCAM", "ScoreCAM"])
def test_segmentation_target_equals_upstream(retina, name):
    """The threshold wrapper's column 1 with activation 'none' is SemanticSegmentationTarget on the raw
    output: sum(out_c · M) over the mask M frozen on the unperturbed input. With activation 'sigmoid'
    it is the same target on the sigmoid output (and a different map)."""
    before = snapshot(retina.model)
    maps = {}
    for activation, threshold, head in (("none", 0.0, nn.Identity()), ("sigmoid", 0.5, nn.Sigmoid())):
        wrapper = {"name": "threshold", "channel": 0, "threshold": threshold, "activation": activation}
        ours = esegeta.explain(retina.model, retina.x, f"gradcam.{name}", target=1, layer="enc2", wrapper=wrapper)
        mask = (_frozen_mask(retina.model, retina.x, nn.Identity(), 0) > 0).float().numpy()  # logit > 0 ⇔ p > 0.5
        direct_model = nn.Sequential(copy.deepcopy(retina.model), head)
        theirs = _direct(name, direct_model, "0.enc2", retina.x, [SemanticSegmentationTarget(0, mask)])
        assert torch.allclose(ours, theirs, atol=ATOL), (activation, (ours - theirs).abs().max())
        maps[activation] = ours
    assert not torch.allclose(maps["none"], maps["sigmoid"], atol=1e-3)
    assert_unchanged(retina.model, before)


def test_segmentation_target_3d_equals_upstream(tissue):
    """The multiclass wrapper (softmax) column k is SemanticSegmentationTarget(k, argmax == k) on the softmax output."""
    ours = esegeta.explain(tissue.model, tissue.x, "gradcam.GradCAM", target=2, layer="enc2", wrapper=tissue.wrapper)
    softmax = nn.Softmax(dim=1)
    mask = (_frozen_mask(tissue.model, tissue.x, softmax, "argmax") == 2).float().numpy()
    theirs = _direct("GradCAM", nn.Sequential(copy.deepcopy(tissue.model), softmax), "0.enc2", tissue.x,
                     [SemanticSegmentationTarget(2, mask)])
    assert ours.shape == (1, 1, *tissue.x.shape[2:])
    assert torch.allclose(ours, theirs, atol=ATOL), (ours - theirs).abs().max()


def _pearson(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.parametrize("case_name", ["digits", "retina"])
def test_gradcam_agrees_with_captum_layergradcam(case_name, request):
    """Same algorithm, two libraries: captum at layer resolution (relu_attributions) upsampled
    bilinearly vs pytorch-grad-cam (min-max scaled, cv2-resized). Measured r = 1.000000000 on both:
    min-max scaling is affine and cv2's bilinear resize is torch's (align_corners=False)."""
    from captum.attr import LayerAttribution

    case = request.getfixturevalue(case_name)
    ours = esegeta.explain(case.model, case.x, "gradcam.GradCAM", target=case.target, layer=case.layer,
                           wrapper=case.wrapper)
    captum = esegeta.explain(case.model, case.x, "captum.LayerGradCam", target=case.target, layer=case.layer,
                             wrapper=case.wrapper, relu_attributions=True)
    upsampled = LayerAttribution.interpolate(captum, tuple(case.x.shape[2:]), "bilinear")
    r = _pearson(ours, upsampled)
    print(f"pearson gradcam.GradCAM vs captum.LayerGradCam ({case.name}, {case.layer}): {r:.9f}")
    assert r > 0.9999


@pytest.mark.parametrize("params,fix", [
    ({"eigen_smoth": True}, "did you mean eigen_smooth?"),
    ({"batch_sise": 8}, "did you mean batch_size?"),
    ({"aug_smooth": "yes"}, "aug_smooth must be true or false"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
])
def test_params_are_checked(params, fix):
    with pytest.raises(ConfigError, match=fix) as info:
        check_method("gradcam.ScoreCAM", params, "enc2", None, "methods[0]")
    assert info.value.path == f"methods[0].params.{next(iter(params))}"


def test_meta_method_params_are_checked():
    check_method("gradcam.RefineCAM", {"base_method": "GradCAM"}, "enc2", None, "m")
    with pytest.raises(ConfigError, match="did you mean GradCAM"):
        check_method("gradcam.RefineCAM", {"base_method": "GradCam"}, "enc2", None, "m")
    with pytest.raises(ConfigError, match="did you mean ratio_channels_to_ablate"):
        check_method("gradcam.AblationCAM", {"ratio_channel_to_ablate": 0.5}, "enc2", None, "m")
    with pytest.raises(ConfigError, match="noise tunnel"):
        check_method("gradcam.GradCAM", {}, "enc2", {"nt_samples": 4}, "m")
    with pytest.raises(ConfigError, match="takes no layer"):
        check_method("gradcam.FullGrad", {}, "enc2", None, "m")


def test_batch_size_reaches_scorecam(digits, monkeypatch):
    seen = []
    original = pgc.ScoreCAM.get_cam_weights
    monkeypatch.setattr(pgc.ScoreCAM, "get_cam_weights",
                        lambda self, *a: seen.append(self.batch_size) or original(self, *a))
    esegeta.explain(digits.model, digits.x, "gradcam.ScoreCAM", target=3, layer="layer2", batch_size=4)
    assert seen == [4]


def test_2d_only_classes_refuse_volumes_clearly(tissue):
    for name in ("ScoreCAM", "AblationCAM", "FullGrad"):
        spec = registry.get(f"gradcam.{name}")
        assert spec.dims == (2,)
        layer = "enc2" if spec.needs_layer else None
        with pytest.raises(ConfigError, match="2D inputs only"):
            esegeta.explain(tissue.model, tissue.x, spec.id, target=2, layer=layer, wrapper=tissue.wrapper)


def test_aug_smooth_refused_with_a_wrapper(retina):
    with pytest.raises(ConfigError, match="aug_smooth"):
        esegeta.explain(retina.model, retina.x, "gradcam.GradCAM", target=1, layer="enc2", wrapper=retina.wrapper,
                        aug_smooth=True)


def test_ablation_swap_and_hooks_undone_on_error(retina):
    """AblationCAM swaps the layer for its AblationLayer; an error mid-way must not leave it there."""
    network = prepared(retina.model, retina.x)
    before = [(n, type(m)) for n, m in network.named_modules()]
    forward = wrappers.build(network, retina.x, dict(retina.wrapper), None)

    class Failing(nn.Module):
        """Fails on the third forward: the first one with the layer swapped."""

        def __init__(self):
            super().__init__()
            self.inner, self.calls = forward, 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom")
            return self.inner(x)

    spec = registry.get("gradcam.AblationCAM")
    call = Call(Failing(), network, retina.x, 1, network.layer("enc2"), {})
    with pytest.raises(RuntimeError, match="boom"):
        run_guarded(spec, call)
    assert [(n, type(m)) for n, m in network.named_modules()] == before
    assert hook_count(network) == 0
    assert all(p.grad is None for p in network.parameters())
    ours = esegeta.explain(retina.model, retina.x, "gradcam.AblationCAM", target=1, layer="enc2",
                           wrapper=retina.wrapper)
    assert torch.isfinite(ours).all() and ours.abs().sum() > 0


def test_refinecam_with_one_layer_is_its_base_method(digits):
    """RefineCAM multiplies the CAMs of its layers; given one layer, it is its base_method."""
    refined = esegeta.explain(digits.model, digits.x, "gradcam.RefineCAM", target=3, layer="layer2",
                              base_method="GradCAM")
    plain = esegeta.explain(digits.model, digits.x, "gradcam.GradCAM", target=3, layer="layer2")
    assert torch.allclose(refined, plain, atol=ATOL)


def test_refinecam_fuses_a_list_of_layers_as_upstream(retina):
    """The entry's ``layer`` list is upstream's ``target_layers`` (a wrapped segmenter: its region target)."""
    ours = esegeta.explain(retina.model, retina.x, "gradcam.RefineCAM", target=1, layer=["enc1", "enc2"],
                           wrapper=retina.wrapper)
    model = copy.deepcopy(retina.model).eval()
    with torch.no_grad():
        mask = (torch.sigmoid(model(retina.x)[0, 0]) > 0.5).float()
    forward = torch.nn.Sequential(model, torch.nn.Sigmoid())
    cam = pgc.RefineCAM(forward, [model.enc1, model.enc2])
    theirs = torch.as_tensor(cam(input_tensor=retina.x, targets=[lambda o: (o[0] * mask).sum()])).unsqueeze(1)
    assert ours.shape == theirs.shape == (1, 1, 48, 48)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert not torch.allclose(ours, esegeta.explain(retina.model, retina.x, "gradcam.RefineCAM", target=1, layer="enc2",
                                                    wrapper=retina.wrapper), atol=1e-3)


def test_hooks_removed_when_upstream_fails_half_way(retina, monkeypatch):
    """A CAM whose constructor fails after registering its hooks leaves none behind (the
    exception info keeps the half-built CAM alive, so its __del__ cannot be what removes them)."""
    registry.get("gradcam.GradCAM").adapter.parameters(registry.get("gradcam.GradCAM"))  # signature read first
    original = pgc.GradCAM.__init__

    def failing_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise RuntimeError("failed after registering hooks")

    monkeypatch.setattr(pgc.GradCAM, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="after registering hooks") as info:
        esegeta.explain(retina.model, retina.x, "gradcam.GradCAM", target=1, layer="enc2", wrapper=retina.wrapper)
    assert hook_count(prepared(retina.model, retina.x)) == 0
    assert info.value is not None
