"""``esegeta.explain`` as a Captum user calls it: layers as modules, targets in every form,
and clear errors (batch axis, wrapper, did you mean) instead of upstream tracebacks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from esegeta import explain
from esegeta.errors import ConfigError


def test_target_defaults_to_predicted(digits):
    default = explain(digits.model, digits.x, "captum.Saliency")
    predicted = explain(digits.model, digits.x, "captum.Saliency", "predicted")
    top = int(digits.model(digits.x).argmax(1))
    by_index = explain(digits.model, digits.x, "captum.Saliency", top)
    assert isinstance(default, torch.Tensor)
    torch.testing.assert_close(default, predicted)
    torch.testing.assert_close(default, by_index)


@pytest.mark.parametrize("form", [list, torch.tensor, tuple])
def test_one_target_per_input(digits, form):
    x = digits.x.repeat(2, 1, 1, 1)
    both = explain(digits.model, x, "captum.Saliency", form([1, 3]))
    one = explain(digits.model, digits.x, "captum.Saliency", 1)
    three = explain(digits.model, digits.x, "captum.Saliency", 3)
    torch.testing.assert_close(both[:1], one)
    torch.testing.assert_close(both[1:], three)


def test_wrong_number_of_targets(digits):
    with pytest.raises(ConfigError, match="3 targets for 1 inputs"):
        explain(digits.model, digits.x, "captum.Saliency", [1, 2, 3])


def test_layer_as_a_module_or_a_name(digits):
    by_module = explain(digits.model, digits.x, "captum.LayerGradCam", 3, layer=digits.model.layer2)
    by_name = explain(digits.model, digits.x, "captum.LayerGradCam", 3, layer="layer2")
    torch.testing.assert_close(by_module, by_name)


def test_a_module_of_another_model_is_refused(digits):
    with pytest.raises(ConfigError, match="not a submodule of the model"):
        explain(digits.model, digits.x, "captum.LayerGradCam", 3, layer=torch.nn.Conv2d(1, 1, 1))


def test_unbatched_input_says_add_the_batch_axis(digits):
    with pytest.raises(ConfigError, match=r"no batch axis.*inputs\[None\]"):
        explain(digits.model, digits.x[0], "captum.Saliency", 3)


def test_segmentation_without_wrapper_says_set_a_wrapper(retina):
    with pytest.raises(ConfigError, match="set a wrapper"):
        explain(retina.model, retina.x, "captum.Saliency")


def test_wrapper_typo_gets_did_you_mean(retina):
    with pytest.raises(ConfigError, match="did you mean threshold"):
        explain(retina.model, retina.x, "captum.Saliency", wrapper={"name": "treshold"})
    with pytest.raises(ConfigError, match=r"wrapper.treshold: unknown key; did you mean threshold"):
        explain(retina.model, retina.x, "captum.Saliency", wrapper={"name": "threshold", "treshold": 0.5})


def test_method_typo_gets_did_you_mean(digits):
    with pytest.raises(ConfigError, match="did you mean captum.Saliency"):
        explain(digits.model, digits.x, "captum.Salency", 3)


def test_values_are_checked_as_in_a_config(digits):
    with pytest.raises(ConfigError, match="n_steps counts"):
        explain(digits.model, digits.x, "captum.IntegratedGradients", 3, n_steps="32")


def test_captum_s_own_forms_are_accepted_from_python(digits):
    """Tuples where Captum takes tuples: the result is Captum's own on the same call."""
    from captum.attr import Occlusion

    ours = explain(digits.model, digits.x, "captum.Occlusion", 3, sliding_window_shapes=(1, 3, 3), strides=(1, 2, 2))
    theirs = Occlusion(digits.model).attribute(digits.x, target=3, sliding_window_shapes=(1, 3, 3), strides=(1, 2, 2))
    torch.testing.assert_close(ours, theirs)
    assert ours.abs().sum() > 0
    # a NumPy integer inside the tuple, and one stride for every axis (Captum takes an int)
    mixed = explain(digits.model, digits.x, "captum.Occlusion", 3, sliding_window_shapes=(1, np.int64(3), 3), strides=2)
    torch.testing.assert_close(mixed, Occlusion(digits.model).attribute(
        digits.x, target=3, sliding_window_shapes=(1, 3, 3), strides=2))


@pytest.mark.parametrize("steps", [np.int64(16), np.int32(16), torch.tensor(16)], ids=["np.int64", "np.int32", "torch"])
def test_numpy_and_torch_integers_are_integers(digits, steps):
    expected = explain(digits.model, digits.x, "captum.IntegratedGradients", 3, n_steps=16)
    torch.testing.assert_close(explain(digits.model, digits.x, "captum.IntegratedGradients", 3, n_steps=steps), expected)
    tunnel = {"nt_samples": np.int64(3), "stdevs": np.float32(0.1), "nt_type": "smoothgrad"}
    torch.manual_seed(0)
    smooth = explain(digits.model, digits.x, "captum.Saliency", 3, noise_tunnel=tunnel)
    torch.manual_seed(0)
    assert torch.equal(smooth, explain(digits.model, digits.x, "captum.Saliency", 3,
                                       noise_tunnel={"nt_samples": 3, "stdevs": 0.1, "nt_type": "smoothgrad"}))


@pytest.mark.parametrize("params, field, message", [
    ({"n_steps": np.float64(16.5)}, "n_steps", "n_steps counts"),
    ({"n_steps": torch.tensor([16, 32])}, "n_steps", "n_steps counts"),
    ({"n_steps": "32"}, "n_steps", "n_steps counts"),
    ({"method": ("gausslegendre",)}, "method", "must be a string"),
])
def test_what_upstream_would_fail_on_is_still_refused(digits, params, field, message):
    with pytest.raises(ConfigError, match=message) as caught:
        explain(digits.model, digits.x, "captum.IntegratedGradients", 3, **params)
    assert caught.value.path == f"explain.params.{field}"


@pytest.mark.parametrize("window, strides, field", [
    ((1, 3), (1, 2, 2), "sliding_window_shapes"), ((1, 9, 3), 1, "sliding_window_shapes"),
    ("(1, 3, 3)", 1, "sliding_window_shapes"), ((1, 3, 3), (1, 0, 2), "strides"), ((1, 2, 2), (1, 3, 3), "strides"),
])
def test_occlusion_refuses_bad_tuples_before_running(digits, window, strides, field):
    with pytest.raises(ConfigError) as caught:
        explain(digits.model, digits.x, "captum.Occlusion", 3, sliding_window_shapes=window, strides=strides)
    assert caught.value.path.endswith(f"params.{field}"), caught.value


def test_a_2d_only_method_refuses_a_3d_model(tissue):
    from esegeta.spec.registry import all_methods

    only_2d = next(s.id for s in all_methods().values() if s.dims == (2,) and not s.needs_layer)
    with pytest.raises(ConfigError, match="2D inputs only"):
        explain(tissue.model, tissue.x, only_2d, wrapper=tissue.wrapper)


def test_segmentation_with_a_class_index_and_no_wrapper_says_set_a_wrapper(retina):
    from conftest import hook_count

    with pytest.raises(ConfigError, match="set a wrapper"):
        explain(retina.model, retina.x, "captum.Saliency", 0)
    assert hook_count(retina.model) == 0
