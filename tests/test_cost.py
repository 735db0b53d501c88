"""esegeta.spec.cost: the model rows a method call needs, counted against the real call (the anchors' methods included).

Every registered method states a formula (``MethodSpec.passes``); for methods whose count the
formula claims exact, the forward rows a real call on the digits sample sends through the model
(counted by a global forward hook on the model's class, which also sees the prepared copy) equal
the formula's.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from esegeta.spec import cost
from esegeta.attribution.call import call_once
from esegeta.attribution.prepare import prepared
from esegeta.attribution.rules import attention_names
from esegeta.spec.request import from_arguments
from esegeta.spec.values import from_python
from esegeta.spec.registry import all_methods, get


def test_every_method_has_a_formula():
    missing = sorted(m for m, spec in all_methods().items() if not callable(spec.passes))
    assert not missing, f"state passes (a cost formula, esegeta.spec.cost) in the adapter tables of {missing}"


def test_gradcam_augmentations_multiply_the_rows(digits):
    spec = get("gradcam.GradCAM")
    plain = cost.expected_passes(spec, {}, digits.x)
    assert cost.expected_passes(spec, {"aug_smooth": True}, digits.x) == plain.times(6)


@contextlib.contextmanager
def counted_rows(model_class: type):
    """Rows through every forward of a model of ``model_class`` while the block runs."""
    rows = {"forward": 0}

    def hook(module, args, output):
        if type(module) is model_class and args and torch.is_tensor(args[0]):
            rows["forward"] += int(args[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield rows
    finally:
        handle.remove()


CALLS = [
    ("captum.Saliency", {}, None),
    ("captum.IntegratedGradients", {"n_steps": 7, "internal_batch_size": 3}, None),
    ("captum.GradientShap", {"n_samples": 4}, None),
    ("captum.DeepLift", {}, None),
    ("captum.Occlusion", {"sliding_window_shapes": [1, 4, 4], "strides": [1, 2, 2]}, None),
    ("captum.Occlusion", {"sliding_window_shapes": [1, 3, 3], "strides": [1, 2, 2]}, None),  # a last partial step
    ("captum.FeatureAblation", {"feature_mask": {"grid": [4, 4]}}, None),
    ("captum.ShapleyValueSampling", {"feature_mask": {"grid": [4, 4]}, "n_samples": 2}, None),
    ("captum.IntegratedGradients", {"n_steps": 4}, {"nt_type": "smoothgrad", "nt_samples": 3}),
    ("zennit.SmoothGrad", {"n_iter": 5}, None),
    ("zennit.Occlusion", {"window": 4, "stride": 2}, None),
    ("torchray.rise", {"num_masks": 20, "batch_size": 8}, None),
    ("shap.GradientExplainer", {"nsamples": 6, "batch_size": 4, "rseed": 0}, None),
    ("lime.LimeImageExplainer", {"num_samples": 30, "random_seed": 0}, None),
    ("torchcam.GradCAM", {}, None),
    ("torchcam.RefineCAM", {}, None),
    ("torchcam.SmoothGradCAMpp", {"num_samples": 3}, None),
    ("monai.GradCAM", {}, None),
    ("monai.SmoothGrad", {"n_samples": 3}, None),
    ("esegeta.BlurIG", {"steps": 3, "max_sigma": 2}, None),
    ("esegeta.GuidedIG", {"x_steps": 3}, None),
    ("esegeta.XRAI", {"steps": 3}, None),
    ("esegeta.CRP", {"conditions": {"layer2": [0, 1]}}, None),
]


@pytest.mark.parametrize("method,params,tunnel", CALLS, ids=[c[0] + ("+nt" if c[2] else "") for c in CALLS])
def test_forward_rows_match_the_real_call(digits, method, params, tunnel):
    spec = get(method)
    if spec.unavailable_reason():
        pytest.skip(spec.unavailable_reason())
    layer = digits.layer_for(spec)
    predicted = cost.expected_passes(spec, params, digits.x, noise_tunnel=tunnel)
    ready = prepared(digits.model, digits.x)  # the copy is made (one counting forward) before, not inside, the call
    # rule-based methods trace the copy once for attention modules (esegeta.attribution.rules, cached per copy):
    # a pass of the copy's first such call, not of the method
    attention_names(ready, digits.x)
    assert predicted.known, predicted.note
    request = from_arguments(method, target=digits.target, layer=layer, noise_tunnel=tunnel, params=from_python(params))
    with counted_rows(type(digits.model)) as rows:  # the method's own rows: explain's verdicts (the axiom check) add theirs
        call_once(request, ready, digits.x, samples=digits.x)
    if predicted.exact:
        assert rows["forward"] == predicted.forward, predicted.text()
    else:  # an estimate: within the count of its unperturbed rows
        assert abs(rows["forward"] - predicted.forward) <= 2, predicted.text()


def test_per_channel_methods_count_by_the_layer(digits):
    spec = get("gradcam.ScoreCAM")
    assert not cost.expected_passes(spec, {}, digits.x).known
    passes = cost.expected_passes(spec, {}, digits.x, layer_shape=[1, 16, 4, 4])
    assert (passes.forward, passes.backward) == (17, 0)


@pytest.mark.parametrize("method,params", [("torchcam.ScoreCAM", {}), ("torchcam.SSCAM", {"num_samples": 2}),
                                           ("torchcam.ISCAM", {"num_samples": 2})])
def test_torchcam_per_channel_rows_match_the_real_call(digits, method, params):
    """TorchCAM's Score-CAM family: one row per channel of the layer (times the samples), counted."""
    spec = get(method)
    shapes = []  # the layer's output shape, as check's forward pass sees it
    handle = digits.model.get_submodule(digits.layer).register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    with torch.no_grad():
        digits.model(digits.x)
    handle.remove()
    predicted = cost.expected_passes(spec, params, digits.x, layer_shape=list(shapes[0]))
    ready = prepared(digits.model, digits.x)
    request = from_arguments(method, target=digits.target, layer=digits.layer, params=from_python(params))
    with counted_rows(type(digits.model)) as rows:
        call_once(request, ready, digits.x, samples=digits.x)
    assert predicted.exact and rows["forward"] == predicted.forward, predicted.text()


def test_shapes_only_meta_inputs_work():
    x = torch.empty(2, 3, 64, 64, device="meta")
    passes = cost.expected_passes(get("captum.Occlusion"), {}, x)
    assert passes.known and passes.forward > 1
    assert cost.estimated_seconds(cost.Passes(10, 10), 0.5) == pytest.approx(15.0)
    assert cost.duration_text(720) == "~12 min"
    assert "unknown" in cost.Passes(None, None, False, "why").text()
