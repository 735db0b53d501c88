"""TorchCAM adapter: equal to upstream called directly (classifier, 2D and 3D segmentation region
targets, LeGrad on a ViT), params checked, hooks gone, cost formulas.

Conformance of every registered ``torchcam.*`` extractor runs in test_conformance.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import esegeta
from esegeta.compat import import_torchvision
from esegeta.errors import ConfigError
from esegeta.spec import cost, registry
from esegeta.spec.params import check_method

from conftest import assert_unchanged, hook_count, snapshot

torchcam_methods = pytest.importorskip("torchcam.methods")

ATOL = 1e-6


def _direct(name, model, layer, x, class_idx=None, targets=None, seed=None, **kwargs):
    """TorchCAM called as its README does, on a copy of the model."""
    model = copy.deepcopy(model).eval()
    if seed is not None:
        torch.manual_seed(seed)
    with getattr(torchcam_methods, name)(model, layer, **kwargs) as extractor:
        scores = model(x)
        maps = extractor(class_idx=class_idx, scores=scores, targets=targets)
    assert hook_count(model) == 0
    return maps[0].unsqueeze(1)


def test_every_exported_extractor_is_registered():
    ids = {m for m in registry.all_methods() if m.startswith("torchcam.")}
    exported = set(torchcam_methods.activation.__all__) | set(torchcam_methods.gradient.__all__)
    assert ids == {f"torchcam.{n}" for n in exported}


@pytest.mark.parametrize("name", ["CAM", "GradCAM", "GradCAMpp", "XGradCAM", "LayerCAM", "ScoreCAM", "ISCAM",
                                  "FinerCAM"])
def test_classifier_equals_upstream(digits, name):
    before = snapshot(digits.model)
    params = {"num_samples": 2} if name == "ISCAM" else {}
    ours = esegeta.explain(digits.model, digits.x, f"torchcam.{name}", target=3, layer="layer2", **params)
    theirs = _direct(name, digits.model, "layer2", digits.x, class_idx=3, **params)
    assert ours.shape == (1, 1, 4, 4) and ours.dtype == torch.float32
    assert torch.allclose(ours, theirs, atol=ATOL), (ours - theirs).abs().max()
    assert ours.amax() > 0
    assert_unchanged(digits.model, before)


@pytest.mark.parametrize("name", ["SSCAM", "SmoothGradCAMpp"])
def test_noisy_extractors_equal_upstream_under_the_same_seed(digits, name):
    torch.manual_seed(7)
    ours = esegeta.explain(digits.model, digits.x, f"torchcam.{name}", target=3, layer="layer2", num_samples=2)
    theirs = _direct(name, digits.model, "layer2", digits.x, class_idx=3, seed=7, num_samples=2)
    assert torch.allclose(ours, theirs, atol=ATOL), (ours - theirs).abs().max()


def test_normalized_false_reaches_upstream(digits):
    ours = esegeta.explain(digits.model, digits.x, "torchcam.GradCAM", target=3, layer="layer2", normalized=False)
    model = copy.deepcopy(digits.model)
    with torchcam_methods.GradCAM(model, "layer2") as extractor:
        theirs = extractor(class_idx=3, scores=model(digits.x), normalized=False)[0].unsqueeze(1)
    assert torch.allclose(ours, theirs, atol=ATOL)
    assert not torch.allclose(ours, esegeta.explain(digits.model, digits.x, "torchcam.GradCAM", target=3, layer="layer2"))


@pytest.mark.parametrize("name,case_name", [("GradCAM", "retina"), ("ScoreCAM", "tissue"), ("GradCAMpp", "tissue")])
def test_segmentation_region_target_equals_upstream(request, name, case_name):
    """The wrapper's column k is upstream's ``targets`` callable ``sum(act(out)_k · M_k)`` over the mask
    frozen on the unperturbed input; Score-CAM runs on the 3D volume (upsampled trilinearly)."""
    case = request.getfixturevalue(case_name)
    before = snapshot(case.model)
    ours = esegeta.explain(case.model, case.x, f"torchcam.{name}", target=case.target, layer=case.layer,
                           wrapper=case.wrapper)
    with torch.no_grad():
        out = case.model(case.x)
    if case.wrapper["name"] == "threshold":  # retina: sigmoid channel 0 over its > 0.5 region
        mask = (torch.sigmoid(out[0, 0]) > 0.5).float()
        head, target = nn.Sigmoid(), (lambda o: (o[0] * mask).sum())
    else:  # tissue: softmax class k over its argmax region
        mask = (out[0].argmax(0) == case.target).float()
        head, target = nn.Softmax(dim=1), (lambda o: (o[case.target] * mask).sum())
    theirs = _direct(name, nn.Sequential(copy.deepcopy(case.model), head), f"0.{case.layer}", case.x, targets=[target])
    assert ours.shape == theirs.shape == (1, 1, *[s // 2 for s in case.x.shape[2:]])
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert_unchanged(case.model, before)


def _vit():
    import_torchvision()
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=5).eval()


def test_legrad_on_a_vit_equals_upstream():
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    before = snapshot(model)
    layer = "encoder.layers.encoder_layer_1"
    ours = esegeta.explain(model, x, "torchcam.LeGrad", target=[1, 4], layer=layer)
    copy_ = copy.deepcopy(model)
    with torchcam_methods.LeGrad(copy_, [copy_.get_submodule(layer)]) as extractor:
        copy_(x)
        theirs = extractor(class_idx=[1, 4])[0].unsqueeze(1)
    assert ours.shape == (2, 1, 4, 4)
    assert torch.allclose(ours, theirs, atol=ATOL), (ours - theirs).abs().max()
    assert_unchanged(model, before)


def test_legrad_refuses_a_layer_that_is_no_vit_block(digits):
    with pytest.raises(ConfigError, match="not a transformer block.*encoder.ln and heads"):
        esegeta.explain(digits.model, digits.x, "torchcam.LeGrad", target=3, layer="layer2")


@pytest.mark.parametrize("params,fix", [
    ({"batch_sise": 8}, "did you mean batch_size?"),
    ({"num_samples": 0}, "num_samples must be a positive integer"),
    ({"normalized": "yes"}, "normalized must be true or false"),
    ({"std": -1}, "std must be a number >= 0"),
])
def test_params_are_checked(params, fix):
    with pytest.raises(ConfigError, match=fix) as info:
        check_method("torchcam.SSCAM", params, "enc2", None, "methods[0]")
    assert info.value.path == f"methods[0].params.{next(iter(params))}"


def test_finercam_base_method_and_fc_layer(digits):
    check_method("torchcam.FinerCAM", {"base_method": "LayerCAM"}, "layer2", None, "m")
    with pytest.raises(ConfigError, match="did you mean LayerCAM"):
        check_method("torchcam.FinerCAM", {"base_method": "LayerCam"}, "layer2", None, "m")
    ours = esegeta.explain(digits.model, digits.x, "torchcam.FinerCAM", target=3, layer="layer2", base_method="LayerCAM")
    theirs = _direct("FinerCAM", digits.model, "layer2", digits.x, class_idx=3,
                     base_method=torchcam_methods.LayerCAM)
    assert torch.allclose(ours, theirs, atol=ATOL)
    fc = esegeta.explain(digits.model, digits.x, "torchcam.CAM", target=3, layer="layer2", fc_layer="fc")
    assert torch.allclose(fc, _direct("CAM", digits.model, "layer2", digits.x, class_idx=3, fc_layer="fc"), atol=ATOL)
    with pytest.raises(ConfigError, match="params.fc_layer.*did you mean fc"):
        esegeta.explain(digits.model, digits.x, "torchcam.CAM", target=3, layer="layer2", fc_layer="fcc")


def test_batch_equals_one_at_a_time(digits):
    x = torch.cat([digits.x, digits.x.flip(-1), digits.x.flip(-2)])
    for name in ("GradCAM", "ScoreCAM"):
        batch = esegeta.explain(digits.model, x, f"torchcam.{name}", target=[3, 1, 7], layer="layer2")
        single = torch.cat([esegeta.explain(digits.model, x[i:i + 1], f"torchcam.{name}", target=t, layer="layer2")
                            for i, t in enumerate([3, 1, 7])])
        assert torch.allclose(batch, single, atol=1e-5), name


def test_cost_formulas_count_channels_and_samples(digits):
    x = torch.empty(1, 1, 8, 8, device="meta")
    layer_shape = (1, 32, 4, 4)
    assert cost.expected_passes(registry.get("torchcam.ScoreCAM"), {}, x, layer_shape=layer_shape) == cost.Passes(34, 0)
    assert cost.expected_passes(registry.get("torchcam.SSCAM"), {}, x, layer_shape=layer_shape) == cost.Passes(
        32 * 35 + 2, 0)
    assert cost.expected_passes(registry.get("torchcam.ISCAM"), {"num_samples": 3}, x,
                                layer_shape=layer_shape) == cost.Passes(98, 0)
    assert cost.expected_passes(registry.get("torchcam.SmoothGradCAMpp"), {}, x) == cost.Passes(5, 4)
    assert not cost.expected_passes(registry.get("torchcam.ScoreCAM"), {}, x).known


def _refined(model, layers, x, class_idx=None, targets=None, **kwargs):
    """RefineCAM called as upstream's docstring does, on a copy of the model."""
    model = copy.deepcopy(model).eval()
    with torchcam_methods.RefineCAM(model, layers, **kwargs) as extractor:
        maps = extractor(class_idx=class_idx, scores=model(x), targets=targets)
    assert hook_count(model) == 0
    return maps[0].unsqueeze(1)


@pytest.mark.parametrize("base", [None, "LayerCAM"])
def test_refinecam_fuses_a_list_of_layers_as_upstream(digits, base):
    """The entry's ``layer`` list is upstream's ``target_layer`` list; the map is on the finest layer's grid."""
    before = snapshot(digits.model)
    params = {"base_method": base} if base else {}
    ours = esegeta.explain(digits.model, digits.x, "torchcam.RefineCAM", target=3, layer=["layer1", "layer2"], **params)
    theirs = _refined(digits.model, ["layer1", "layer2"], digits.x, class_idx=3,
                      **({"base_method": getattr(torchcam_methods, base)} if base else {}))
    assert ours.shape == (1, 1, 8, 8) and ours.amax() > 0
    assert torch.allclose(ours, theirs, atol=ATOL), (ours - theirs).abs().max()
    assert_unchanged(digits.model, before)


def test_refinecam_on_a_wrapped_3d_segmenter_equals_upstream(tissue):
    ours = esegeta.explain(tissue.model, tissue.x, "torchcam.RefineCAM", target=tissue.target, layer=["enc1", "enc2"],
                           wrapper=tissue.wrapper)
    with torch.no_grad():
        mask = (tissue.model(tissue.x)[0].argmax(0) == tissue.target).float()
    model = nn.Sequential(copy.deepcopy(tissue.model), nn.Softmax(dim=1))
    theirs = _refined(model, ["0.enc1", "0.enc2"], tissue.x, targets=[lambda o: (o[tissue.target] * mask).sum()])
    assert ours.shape == tissue.x.shape  # enc1 keeps the input's grid
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


@pytest.mark.parametrize("method,layer,fix", [
    ("torchcam.RefineCAM", "layer2", "fuses 2 or more layers: give 'layer' as a list"),
    ("torchcam.RefineCAM", ["layer1", "layer2", "layer1"], "names a layer twice"),
    ("gradcam.RefineCAM", ["layer2", "layer2"], "names a layer twice"),
    ("torchcam.GradCAM", ["layer1", "layer2"], "takes one layer: give its name"),
])
def test_layer_lists_only_for_a_method_that_fuses_layers(method, layer, fix):
    with pytest.raises(ConfigError, match=fix) as info:
        check_method(method, {}, layer, None, "methods[0]")
    assert info.value.path == "methods[0].layer"


def test_a_config_names_the_layers_to_fuse(tmp_path):
    """A config's ``layer`` list is checked name by name before the run (validate, check), and runs."""
    from esegeta import Pipeline
    from esegeta.run.check import check

    from conftest import ROOT

    def config(layer):
        return {"model": {"factory": str(ROOT / "samples/models.py") + ":DigitResNet",
                          "weights": str(ROOT / "samples/checkpoints/digit_resnet.pt")},
                "inputs": {"paths": [str(ROOT / "samples/data/digits/digit_30_label3.npy")], "spatial_dims": 2},
                "target": 3, "output": {"dir": str(tmp_path / "out"), "formats": ["npy"]},
                "methods": [{"id": "torchcam.RefineCAM", "layer": layer}]}

    with pytest.raises(ConfigError, match=r"methods\[0\]\.layer\[1\]: the model has no layer 'layer9'"):
        Pipeline(config(["layer1", "layer9"])).validate()
    verdict = check(config(["layer1", "layer2"])).methods[0]
    assert verdict.ok and verdict.forward_rows is not None, verdict.problems
    result = Pipeline(config(["layer1", "layer2"])).run()
    assert [r["status"] for r in result.runs] == ["ok"]
