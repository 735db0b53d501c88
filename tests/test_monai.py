"""MONAI ``monai.visualize`` adapter: equal to upstream called directly (classifier, 2D and 3D
segmentation region targets), params checked, MONAI's handle-less hooks undone, occlusion's cost.

Conformance of every registered ``monai.*`` explainer runs in test_conformance.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import esegeta
from esegeta.errors import ConfigError
from esegeta.spec import cost, registry
from esegeta.spec.params import check_method

from conftest import assert_unchanged, hook_count, snapshot

visualize = pytest.importorskip("monai.visualize")

ATOL = 1e-6
NAMES = ("CAM", "GradCAM", "GradCAMpp", "VanillaGrad", "SmoothGrad", "GuidedBackpropGrad", "GuidedBackpropSmoothGrad",
         "OcclusionSensitivity")


def test_the_eight_explainers_are_registered():
    assert {m for m in registry.all_methods() if m.startswith("monai.")} == {f"monai.{n}" for n in NAMES}
    for name in NAMES:
        assert hasattr(visualize, name)


def _cam(name, model, layer, x, class_idx, **kw):
    model = copy.deepcopy(model)
    return getattr(visualize, name)(nn_module=model, target_layers=layer, **kw)(x, class_idx=class_idx)


def _gradient(name, model, x, index, seed=None, **kw):
    model = copy.deepcopy(model)
    if seed is not None:
        torch.manual_seed(seed)
    return getattr(visualize, name)(model, verbose=False, **kw)(x.clone(), index=index) if "Smooth" in name else \
        getattr(visualize, name)(model, **kw)(x.clone(), index=index)


def _occlusion(model, x, target, **kw):
    sensitivity, _ = visualize.OcclusionSensitivity(nn_module=copy.deepcopy(model), verbose=False, **kw)(x)
    return sensitivity.as_tensor()[:, target:target + 1]


@pytest.mark.parametrize("name", ["CAM", "GradCAM", "GradCAMpp"])
def test_cams_equal_upstream_on_a_classifier(digits, name):
    before = snapshot(digits.model)
    ours = esegeta.explain(digits.model, digits.x, f"monai.{name}", target=3, layer="layer2")
    theirs = _cam(name, digits.model, "layer2", digits.x, [3] if name == "CAM" else 3)
    assert ours.shape == (1, 1, 8, 8) and ours.dtype == torch.float32
    assert torch.allclose(ours, theirs, atol=ATOL), (ours - theirs).abs().max()
    assert_unchanged(digits.model, before)


@pytest.mark.parametrize("name", ["VanillaGrad", "GuidedBackpropGrad", "SmoothGrad", "GuidedBackpropSmoothGrad"])
def test_gradients_equal_upstream_on_a_classifier(digits, name):
    params = {"n_samples": 3} if "Smooth" in name else {}
    torch.manual_seed(5)
    ours = esegeta.explain(digits.model, digits.x, f"monai.{name}", target=3, **params)
    theirs = _gradient(name, digits.model, digits.x, 3, seed=5, **params)
    assert ours.shape == digits.x.shape
    assert torch.allclose(ours, theirs, atol=ATOL), (ours - theirs).abs().max()


def test_guided_backprop_differs_from_vanilla(digits):
    """The digits model's ReLU module is named ``relu``: MONAI swaps it for its guided ReLU."""
    vanilla = esegeta.explain(digits.model, digits.x, "monai.VanillaGrad", target=3)
    guided = esegeta.explain(digits.model, digits.x, "monai.GuidedBackpropGrad", target=3)
    assert not torch.allclose(vanilla, guided)


def test_occlusion_equals_upstream_on_a_classifier(digits):
    ours = esegeta.explain(digits.model, digits.x, "monai.OcclusionSensitivity", target=3, mask_size=4, n_batch=5)
    theirs = _occlusion(digits.model, digits.x, 3, mask_size=4, n_batch=5)
    assert ours.shape == (1, 1, 8, 8)
    assert torch.allclose(ours, theirs, atol=ATOL), (ours - theirs).abs().max()


def _region_model(case):
    """The case's model with its wrapper's activation and upstream's region score: sum(act_k · M_k)."""
    with torch.no_grad():
        out = case.model(case.x)
    if case.wrapper["name"] == "threshold":
        masks = torch.stack([torch.sigmoid(out[0, 0]) <= 0.5, torch.sigmoid(out[0, 0]) > 0.5]).float()

        def score(o):
            a = torch.sigmoid(o[:, 0:1])
            return (a * masks).flatten(2).sum(-1)
    else:
        classes = out.shape[1]
        masks = torch.stack([out[0].argmax(0) == k for k in range(classes)]).float()

        def score(o):
            return (torch.softmax(o, 1) * masks).flatten(2).sum(-1)

    class Region(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = copy.deepcopy(case.model)

        def forward(self, x):
            return score(self.model(x))

    return Region()


@pytest.mark.parametrize("name,case_name", [("GradCAM", "retina"), ("GradCAM", "tissue"), ("VanillaGrad", "tissue"),
                                            ("OcclusionSensitivity", "tissue")])
def test_segmentation_region_target_equals_upstream(request, name, case_name):
    case = request.getfixturevalue(case_name)
    before = snapshot(case.model)
    params = {"mask_size": 8} if name == "OcclusionSensitivity" else {}
    ours = esegeta.explain(case.model, case.x, f"monai.{name}", target=case.target, wrapper=case.wrapper,
                           layer=case.layer if name == "GradCAM" else None, **params)
    region = _region_model(case)
    if name == "GradCAM":
        theirs = _cam(name, region, f"model.{case.layer}", case.x, case.target)
    elif name == "VanillaGrad":
        theirs = _gradient(name, region, case.x, case.target)
    else:
        theirs = _occlusion(region, case.x, case.target, **params)
    assert ours.shape[2:] == case.x.shape[2:]
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert ours.abs().sum() > 0
    assert_unchanged(case.model, before)


def test_handle_less_hooks_and_inplace_flags_are_undone(digits):
    """MONAI's ModelWithHooks registers hooks without handles and sets inplace=False on hooked layers."""
    from esegeta.attribution.prepare import prepared

    network = prepared(digits.model, digits.x)
    flags = [(n, getattr(m, "inplace", None)) for n, m in network.named_modules()]
    esegeta.explain(digits.model, digits.x, "monai.GradCAM", target=3, layer="layer2")
    assert network is prepared(digits.model, digits.x)  # the copy explain used
    assert hook_count(network) == 0
    assert [(n, getattr(m, "inplace", None)) for n, m in network.named_modules()] == flags


def test_cam_fc_layers_names_a_module_of_the_model(digits):
    ours = esegeta.explain(digits.model, digits.x, "monai.CAM", target=3, layer="layer2", fc_layers="fc")
    assert torch.allclose(ours, _cam("CAM", digits.model, "layer2", digits.x, [3], fc_layers="fc"), atol=ATOL)
    with pytest.raises(ConfigError, match="params.fc_layers.*did you mean fc"):
        esegeta.explain(digits.model, digits.x, "monai.CAM", target=3, layer="layer2", fc_layers="fcc")


def test_batch_equals_one_at_a_time(digits):
    x = torch.cat([digits.x, digits.x.flip(-1)])
    for name, targets in (("GradCAM", [3, 3]), ("GradCAM", [3, 1]), ("CAM", [3, 1]), ("VanillaGrad", [3, 1])):
        layer = "layer2" if "CAM" in name else None
        batch = esegeta.explain(digits.model, x, f"monai.{name}", target=targets, layer=layer)
        single = torch.cat([esegeta.explain(digits.model, x[i:i + 1], f"monai.{name}", target=t, layer=layer)
                            for i, t in enumerate(targets)])
        assert torch.allclose(batch, single, atol=1e-5), (name, targets)


@pytest.mark.parametrize("params,fix", [
    ({"mask_sise": 8}, "did you mean mask_size?"),
    ({"overlap": 1.0}, r"overlap must be a number in \[0, 1\)"),
    ({"mode": "mean"}, "mode must be 'gaussian'"),
    ({"b_box": [1, 2, 3]}, "b_box must be null or"),
])
def test_params_are_checked(params, fix):
    with pytest.raises(ConfigError, match=fix) as info:
        check_method("monai.OcclusionSensitivity", params, None, None, "methods[0]")
    assert info.value.path == f"methods[0].params.{next(iter(params))}"


def test_occlusion_cost_is_monai_windows():
    """The issue's figures: 3,375 forwards at 96³ and 38,025 at 240×240×155 with MONAI's defaults."""
    spec = registry.get("monai.OcclusionSensitivity")
    for shape, rows in (((96, 96, 96), 3375), ((240, 240, 155), 38025), ((8, 8), 25)):
        x = torch.empty(1, 1, *shape, device="meta")
        params = {"mask_size": 4} if shape == (8, 8) else {}
        assert cost.expected_passes(spec, params, x) == cost.Passes(rows, 0), shape
    x = torch.empty(1, 1, 96, 96, 96, device="meta")
    assert cost.expected_passes(spec, {"b_box": [40, 55, -1, -1, 0, 15]}, x).forward < 3375


def test_occlusion_counts_its_forwards(digits):
    """The formula equals the rows the model sees."""
    rows = []
    model = copy.deepcopy(digits.model)
    handle = model.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    esegeta.explain(model, digits.x, "monai.OcclusionSensitivity", target=3, mask_size=4, overlap=0.5)
    handle.remove()
    expected = cost.expected_passes(registry.get("monai.OcclusionSensitivity"), {"mask_size": 4, "overlap": 0.5},
                                    digits.x)
    assert sum(rows) - 2 == expected.forward  # esegeta's unperturbed forwards: the prepared copy's, the score
