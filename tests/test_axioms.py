"""Methods against their axioms, through esegeta's wrappers and model preparation.

- Integrated Gradients completeness: sum(attr) = F(x) - F(baseline) for every wrapper,
  in 2D and 3D. The ancestor's threshold wrapper, ``(out / out) * mask``, has zero
  gradient: these scores must differ and be reached by the attributions.
- DeepLift summation-to-delta on the classifier whose residual blocks reuse one ReLU,
  with the user's model left untouched.
"""
from __future__ import annotations


import pytest
import torch

import esegeta
from esegeta.attribution import wrappers
from esegeta.attribution.prepare import prepared

from conftest import ROOT, assert_unchanged, snapshot

WRAPPER_DIR = ROOT / "wrappers"


def _wrapped_scores(model, x, wrapper, target):
    """F(x) and F(0) of the wrapped model, masks frozen from x (independent of explain)."""
    ready = prepared(model, x)
    forward = wrappers.build(ready, x, wrapper, ROOT)
    with torch.no_grad():
        return float(forward(x)[0, target]), float(forward(torch.zeros_like(x))[0, target])


def _completeness(model, x, wrapper, target, n_steps=256):
    """(sum of IG attributions, F(x) - F(0)); IG's discretisation error shrinks with n_steps
    (on the retina U-Net: 2.3% at 64 steps, 0.6% at 128, 0.07% at 256)."""
    attr = esegeta.explain(model, x, "captum.IntegratedGradients", target=target, wrapper=wrapper, n_steps=n_steps,
                           internal_batch_size=64)
    fx, f0 = _wrapped_scores(model, x, wrapper, target)
    return float(attr.sum()), fx - f0


WRAPPERS_2D = {
    "threshold": ({"name": "threshold", "channel": 0, "threshold": 0.5, "activation": "sigmoid"}, 1),
    "threshold-otsu-mean": ({"name": "threshold", "threshold": "otsu", "activation": "sigmoid",
                             "reduction": "mean"}, 1),
    "region": ({"name": "region", "mask": str(ROOT / "samples/data/retina_crop_vessels.png"),
                "activation": "sigmoid"}, 0),
    "component": ({"name": str(WRAPPER_DIR / "connected_component.py") + ":component",
                   "options": {"threshold": 0.5, "activation": "sigmoid"}}, 1),
}
WRAPPERS_3D = {
    "multiclass": ({"name": "multiclass", "activation": "softmax"}, 2),
    "threshold": ({"name": "threshold", "channel": 2, "threshold": 0.5, "activation": "softmax"}, 1),
    "multiclass-mean": ({"name": "multiclass", "activation": "softmax", "reduction": "mean"}, 1),
}


@pytest.mark.parametrize("name", list(WRAPPERS_2D))
def test_integrated_gradients_completeness_2d(retina, name, tmp_path):
    wrapper, target = WRAPPERS_2D[name]
    if name == "region":  # the sample mask is 128x128: crop it like the input
        from PIL import Image

        mask = Image.open(wrapper["mask"]).crop((0, 0, retina.x.shape[-1], retina.x.shape[-2]))
        mask.save(tmp_path / "mask.png")
        wrapper = {**wrapper, "mask": str(tmp_path / "mask.png")}
    total, delta = _completeness(retina.model, retina.x, wrapper, target)
    assert abs(delta) > 1e-3, "the wrapped score does not depend on the input (zero-gradient wrapper)"
    assert total == pytest.approx(delta, rel=0.01, abs=1e-3)


@pytest.mark.parametrize("name", list(WRAPPERS_3D))
def test_integrated_gradients_completeness_3d(tissue, name):
    wrapper, target = WRAPPERS_3D[name]
    total, delta = _completeness(tissue.model, tissue.x, wrapper, target)
    assert abs(delta) > 1e-3
    assert total == pytest.approx(delta, rel=0.01, abs=1e-3)


def test_integrated_gradients_completeness_deep_supervision(retina):
    from esegeta.io.loading import load_callable

    model = load_callable("samples/deep_supervised.py:DeepSupervisedVesselUNet", ROOT, "model.factory")()
    model.load_state_dict(retina.model.state_dict())
    model.eval()
    wrapper = {"name": str(WRAPPER_DIR / "deep_supervision.py") + ":fused",
               "options": {"threshold": 0.5, "activation": "sigmoid", "weights": [1.0, 0.5]}}
    total, delta = _completeness(model, retina.x, wrapper, 1)
    assert abs(delta) > 1e-3
    assert total == pytest.approx(delta, rel=0.01, abs=1e-3)


def test_wrapper_gradient_is_not_zero(retina):
    """The ancestor's (out/out)*mask had zero gradient; ours has the model output's."""
    wrapper, target = WRAPPERS_2D["threshold"]
    sal = esegeta.explain(retina.model, retina.x, "captum.Saliency", target=target, wrapper=wrapper)
    assert sal.abs().sum() > 0


def test_masks_are_frozen(retina):
    """Perturbing the input changes the score, never the mask."""
    wrapper, _ = WRAPPERS_2D["threshold"]
    ready = prepared(retina.model, retina.x)
    forward = wrappers.build(ready, retina.x, wrapper)
    masks = forward.score.masks.clone()
    forward(torch.rand_like(retina.x))
    forward(torch.zeros_like(retina.x))
    assert torch.equal(forward.score.masks, masks)
    with torch.no_grad():
        expected = (torch.sigmoid(retina.model(retina.x))[0, 0] > 0.5).float()
    assert torch.equal(masks[0, 1], expected) and torch.equal(masks[0, 0], 1 - expected)


def test_deeplift_summation_to_delta_on_reused_relu(digits):
    before = snapshot(digits.model)
    reused = [n for n, m in digits.model.named_modules() if n.endswith("relu")]
    assert "layer1.relu" in reused, "the sample must reuse one ReLU per block, as torchvision does"
    attr = esegeta.explain(digits.model, digits.x, "captum.DeepLift", target=3)
    with torch.no_grad():
        delta = float(digits.model(digits.x)[0, 3] - digits.model(torch.zeros_like(digits.x))[0, 3])
    assert abs(delta) > 1e-2
    assert float(attr.sum()) == pytest.approx(delta, abs=1e-4 * max(1.0, abs(delta)))
    assert_unchanged(digits.model, before)


def test_upstream_deeplift_breaks_on_the_reused_relu(digits):
    """Why preparation exists: Captum's DeepLift on the user's model itself (a copy here)
    either raises or misses summation-to-delta."""
    import copy

    from captum.attr import DeepLift

    model = copy.deepcopy(digits.model)
    with torch.no_grad():
        delta = float(model(digits.x)[0, 3] - model(torch.zeros_like(digits.x))[0, 3])
    try:
        attr = DeepLift(model).attribute(digits.x.clone(), target=3)
    except Exception:
        return
    assert abs(float(attr.sum()) - delta) > 1e-3


def test_integrated_gradients_completeness_classifier(digits):
    attr, delta = esegeta.explain(digits.model, digits.x, "captum.IntegratedGradients", target=3, n_steps=64), None
    with torch.no_grad():
        delta = float(digits.model(digits.x)[0, 3] - digits.model(torch.zeros_like(digits.x))[0, 3])
    assert float(attr.sum()) == pytest.approx(delta, rel=0.01, abs=1e-3)


def test_batch_with_wrapper_freezes_masks_per_input(retina):
    """A batch of two inputs gives the same attributions as each input alone."""
    wrapper, target = WRAPPERS_2D["threshold"]
    x2 = torch.cat([retina.x, retina.x.flip(-1)])
    both = esegeta.explain(retina.model, x2, "captum.IntegratedGradients", target=target, wrapper=wrapper, n_steps=16)
    first = esegeta.explain(retina.model, x2[:1], "captum.IntegratedGradients", target=target, wrapper=wrapper,
                            n_steps=16)
    second = esegeta.explain(retina.model, x2[1:], "captum.IntegratedGradients", target=target, wrapper=wrapper,
                             n_steps=16)
    torch.testing.assert_close(both, torch.cat([first, second]))

