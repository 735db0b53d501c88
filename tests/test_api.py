"""``esegeta.explain`` as a Captum user calls it: layers as modules, targets in every form,
and clear errors (batch axis, wrapper, did you mean) instead of upstream tracebacks."""
from __future__ import annotations

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
