"""TorchRay adapter: equal to TorchRay called directly, agreement with Captum, clean-up, config checks."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

import esegeta
from esegeta.spec import registry
from esegeta.attribution import wrappers
from esegeta.compat import import_torchvision
from esegeta.spec.config import WrapperConfig
from esegeta.spec.params import check_method
from esegeta.errors import ConfigError
from esegeta.attribution.explainer import run
from esegeta.attribution.prepare import prepared
from esegeta.spec.request import Request

from conftest import assert_unchanged, hook_count, snapshot

pytest.importorskip("torchray")

NINE = ("gradient", "deconvnet", "guided_backprop", "grad_cam", "linear_approx", "excitation_backprop",
        "contrastive_excitation_backprop", "rise", "extremal_perturbation")


def _torchray(module: str, name: str):
    import importlib

    import_torchvision()  # torchray.attribution.excitation_backprop imports torchvision
    return getattr(importlib.import_module(f"torchray.attribution.{module}"), name)


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy for direct TorchRay calls (in-place ReLUs off, as TorchRay's probes want)."""
    work = copy.deepcopy(model).eval()
    for module in work.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return work


def _wrapped(case, model, **overrides):
    cfg = WrapperConfig.model_validate({**case.wrapper, **overrides})
    return wrappers.build(model, case.x, cfg)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def test_all_nine_registered():
    ids = {i for i in registry.all_methods() if i.startswith("torchray.")}
    assert ids == {f"torchray.{n}" for n in NINE}
    two_d_only = {i for i in ids if registry.get(i).dims == (2,)}
    assert two_d_only == {"torchray.grad_cam", "torchray.rise", "torchray.extremal_perturbation"}
    for row in esegeta.methods():
        if row["library"] == "torchray":
            assert row["available"], row


@pytest.mark.parametrize("name,module,layer", [
    ("gradient", "gradient", None), ("guided_backprop", "guided_backprop", None),
    ("deconvnet", "deconvnet", None), ("grad_cam", "grad_cam", "layer2"),
    ("linear_approx", "linear_approx", "layer2"), ("excitation_backprop", "excitation_backprop", "layer2"),
    ("contrastive_excitation_backprop", "excitation_backprop", "layer2"),
])
def test_equals_direct_call_digits(digits, name, module, layer):
    fn = _torchray(module, name)
    model = _plain_copy(digits.model)
    kwargs = {"saliency_layer": model.get_submodule(layer)} if layer else {}
    if name == "contrastive_excitation_backprop":
        kwargs["contrast_layer"] = model.get_submodule("pool")
    expected = fn(model, digits.x.clone(), digits.target, **kwargs)
    params = {"contrast_layer": "pool"} if name == "contrastive_excitation_backprop" else {}
    got = esegeta.explain(digits.model, digits.x, f"torchray.{name}", digits.target, layer=layer, **params)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert got.abs().sum() > 0


def test_rise_and_extremal_equal_direct_call_digits(digits):
    model = _plain_copy(digits.model)
    expected = _torchray("rise", "rise_class")(model, digits.x.clone(), target=[3], num_masks=64)
    got = esegeta.explain(digits.model, digits.x, "torchray.rise", 3, num_masks=64)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)

    masks, hist = _torchray("extremal_perturbation", "extremal_perturbation")(
        model, digits.x.clone(), 3, areas=[0.1, 0.3], max_iter=10, step=1, sigma=3.0)
    spec = registry.get("torchray.extremal_perturbation")
    request = Request(spec, {"areas": [0.1, 0.3], "max_iter": 10, "step": 1, "sigma": 3.0}, target=3)
    outcome = run(request, prepared(digits.model, digits.x), digits.x)
    got, extras = outcome.result, outcome.extras
    assert got.shape == (1, 2, 8, 8)  # one mask per area, as channels
    assert torch.allclose(got, masks.transpose(0, 1), rtol=1e-5, atol=1e-6)
    assert torch.allclose(extras["hist"][0], hist, rtol=1e-5, atol=1e-6)
    assert 0 <= float(got.min()) and float(got.max()) <= 1


@pytest.mark.parametrize("name,module,fn_name,layer,params", [
    ("guided_backprop", "guided_backprop", "guided_backprop", None, {}),
    ("grad_cam", "grad_cam", "grad_cam", "enc2", {}),
    ("rise", "rise", "rise_class", None, {"num_masks": 64}),
])
def test_wrapped_segmenter_equals_direct_call(retina, name, module, fn_name, layer, params):
    """With a wrapper, TorchRay explains the wrapped (B, K) scores: same as calling it on wrappers.build()."""
    forward = _wrapped(retina, _plain_copy(retina.model))
    kwargs = {"saliency_layer": forward.model.get_submodule(layer)} if layer else {}
    target = [retina.target] if fn_name == "rise_class" else retina.target
    expected = _torchray(module, fn_name)(forward, retina.x.clone(), target=target, **kwargs, **params)
    got = esegeta.explain(retina.model, retina.x, f"torchray.{name}", retina.target, wrapper=retina.wrapper,
                          layer=layer, **params)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got.abs().sum() > 0


def test_wrapped_3d_equals_direct_call(tissue):
    """3D: excitation backprop patches conv3d/avg_pool3d too, and runs on the wrapped 3D U-Net."""
    forward = _wrapped(tissue, _plain_copy(tissue.model))
    fn = _torchray("excitation_backprop", "excitation_backprop")
    expected = fn(forward, tissue.x.clone(), tissue.target, saliency_layer=forward.model.get_submodule("enc2"))
    got = esegeta.explain(tissue.model, tissue.x, "torchray.excitation_backprop", tissue.target,
                          wrapper=tissue.wrapper, layer="enc2")
    assert got.shape == (1, 1, 10, 12, 8)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_batch_with_predicted_targets(digits):
    """A batch with one target per input: the seed gets one class per row; extremal perturbation
    (one input per upstream call) is run input by input."""
    x = torch.cat([digits.x, digits.x.flip(-1)])
    for name, params in (("gradient", {}), ("extremal_perturbation", {"max_iter": 4, "step": 1, "sigma": 3.0})):
        both = esegeta.explain(digits.model, x, f"torchray.{name}", "predicted", **params)
        predicted = digits.model(x).argmax(1)
        singles = [esegeta.explain(digits.model, x[i:i + 1], f"torchray.{name}", int(predicted[i]), **params)
                   for i in range(2)]
        assert torch.allclose(both, torch.cat(singles), rtol=1e-5, atol=1e-6)


def test_contrastive_default_is_target_minus_dual(digits):
    """Without contrast_layer the contrast is taken at the saliency layer: clamp(P - N), P the excitation
    of the target, N that of the dual (classifier weights negated): the paper's contrastive map."""
    contrastive = esegeta.explain(digits.model, digits.x, "torchray.contrastive_excitation_backprop", 3,
                                  layer="layer2")
    positive = esegeta.explain(digits.model, digits.x, "torchray.excitation_backprop", 3, layer="layer2")
    model = prepared(digits.model, digits.x)
    model.model.fc.weight.data.neg_()
    try:
        negative = esegeta.explain(model, digits.x, "torchray.excitation_backprop", 3, layer="layer2")
    finally:
        model.model.fc.weight.data.neg_()
    assert torch.allclose(contrastive, (positive - negative).clamp(min=0), atol=1e-7)
    assert contrastive.abs().sum() > 0 and not torch.allclose(contrastive, positive.clamp(min=0))


@pytest.mark.parametrize("which", ["digits", "retina"])
def test_agrees_with_captum(which, request):
    """TorchRay reduces channels to one map: max over channels of |gradient| (gradient, guided backprop,
    deconvnet) and a ReLU for Grad-CAM. Captum keeps signs and channels; brought to TorchRay's form its
    results are the same (measured: Pearson 1.000000, max difference 0 on both cases)."""
    case = request.getfixturevalue(which)
    layer = case.layer
    pairs = [("gradient", "Saliency", None, {"abs": False}), ("guided_backprop", "GuidedBackprop", None, {}),
             ("deconvnet", "Deconvolution", None, {}), ("grad_cam", "LayerGradCam", layer, {})]
    for ours, theirs, layer_name, params in pairs:
        a = esegeta.explain(case.model, case.x, f"torchray.{ours}", case.target, wrapper=case.wrapper,
                            layer=layer_name)
        b = esegeta.explain(case.model, case.x, f"captum.{theirs}", case.target, wrapper=case.wrapper,
                            layer=layer_name, **params)
        b = b.clamp(min=0) if ours == "grad_cam" else b.abs().amax(dim=1, keepdim=True)
        assert _pearson(a, b) > 0.99, ours
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), ours


def test_model_and_torch_restored_after_failure(digits):
    """A failing call (class 99 does not exist) leaves no patch on torch, no hook, and the parameters'
    requires_grad as they were (TorchRay sets them to False)."""
    relu, conv2d = torch.relu, torch.nn.functional.conv2d
    model = prepared(digits.model, digits.x)
    before = snapshot(digits.model)
    grads = [p.requires_grad for p in model.parameters()]
    for name, layer in (("guided_backprop", None), ("excitation_backprop", "layer2"),
                        ("contrastive_excitation_backprop", "layer2"), ("grad_cam", "layer2")):
        with pytest.raises(RuntimeError):
            esegeta.explain(digits.model, digits.x, f"torchray.{name}", 99, layer=layer)
        assert torch.relu is relu and torch.nn.functional.conv2d is conv2d
        assert hook_count(model) == 0
        assert [p.requires_grad for p in model.parameters()] == grads
    # TorchRay never restores requires_grad after extremal perturbation, even on success.
    esegeta.explain(digits.model, digits.x, "torchray.extremal_perturbation", 3, max_iter=2, step=1, sigma=3.0)
    assert [p.requires_grad for p in model.parameters()] == grads
    assert_unchanged(digits.model, before)


def test_rise_warns_when_wrapped_scores_saturate_its_sigmoid(retina, caplog):
    with caplog.at_level(logging.WARNING, logger="esegeta"):
        esegeta.explain(retina.model, retina.x, "torchray.rise", 1, wrapper=retina.wrapper, num_masks=8)
    assert "reduction" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="esegeta"):
        esegeta.explain(retina.model, retina.x, "torchray.rise", 1, wrapper={**retina.wrapper, "reduction": "mean"},
                        num_masks=8)
    assert "sigmoid" not in caplog.text


@pytest.mark.parametrize("method,params,path,message", [
    ("torchray.rise", {"num_mask": 64}, "m.params.num_mask", "did you mean num_masks?"),
    ("torchray.extremal_perturbation", {"max_iters": 5}, "m.params.max_iters", "did you mean max_iter?"),
    ("torchray.extremal_perturbation", {"variant": "preserved"}, "m.params.variant", "preserve, delete, dual"),
    ("torchray.extremal_perturbation", {"areas": 10}, "m.params.areas", "between 0 and 1"),
    ("torchray.extremal_perturbation", {"reward_func": "reward"}, "m.params.reward_func", "contrastive_reward"),
    ("torchray.rise", {"num_masks": 0}, "m.params.num_masks", "positive integer"),
    ("torchray.gradient", {"resize": "yes"}, "m.params.resize", "[width, height]"),
    ("torchray.gradient", {"debug": True}, "m.params.debug", "unknown parameter"),
    ("torchray.grad_cam", {"resize_mode": "nearest"}, "m.params.resize_mode", "bilinear, bicubic, trilinear"),
    ("torchray.rise", {"seed": 0.5}, "m.params.seed", "non-negative integer"),
    ("torchray.contrastive_excitation_backprop", {"contrast_layer": 3}, "m.params.contrast_layer", "layer name"),
])
def test_bad_params_are_config_errors(method, params, path, message):
    layer = "layer2" if registry.get(method).needs_layer else None
    with pytest.raises(ConfigError) as err:
        check_method(method, params, layer, None, "m")
    assert err.value.path == path and message in err.value.message


def test_layer_params_are_checked_against_the_model(digits):
    with pytest.raises(ConfigError, match="did you mean layer2"):
        esegeta.explain(digits.model, digits.x, "torchray.contrastive_excitation_backprop", 3, layer="layer2",
                        contrast_layer="layer22")
    check_method("torchray.contrastive_excitation_backprop", {"contrast_layer": "pool", "classifier_layer": "fc"},
                 "layer2", None, "m")
    with pytest.raises(ConfigError, match="noise tunnel"):
        check_method("torchray.gradient", {}, None, {"nt_samples": 4}, "m")


def test_same_result_under_the_runners_random_mode(digits):
    """The runner draws torch's random numbers through a torch-function mode; TorchRay's excitation
    backprop patches break under one (F.batch_norm re-dispatch), so the adapter runs TorchRay without it."""
    from esegeta.attribution.scheduling import JobRandomness

    for name, layer, params in (("excitation_backprop", "layer2", {}), ("contrastive_excitation_backprop", "layer2", {}),
                                ("rise", None, {"num_masks": 32})):
        plain = esegeta.explain(digits.model, digits.x, f"torchray.{name}", 3, layer=layer, **params)
        with JobRandomness(seed=123):
            moded = esegeta.explain(digits.model, digits.x, f"torchray.{name}", 3, layer=layer, **params)
        assert torch.equal(plain, moded), name
