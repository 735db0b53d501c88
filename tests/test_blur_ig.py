"""esegeta.BlurIG: PAIR saliency's Blur IG in torch, N-d, equal to ``saliency.core.BlurIG`` on 2D inputs
(upstream is 2D, channels-last numpy); its blur equal to SciPy's on volumes; batch, wrapper, meta device.

Conformance (2D and 3D, classifier and wrapped segmenters) runs in test_conformance.py.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import ndimage

import esegeta
from esegeta.algorithms.blur_ig import gaussian_blur
from esegeta.errors import ConfigError
from esegeta.spec.params import check_method

saliency = pytest.importorskip("saliency.core")


def _upstream(model, x, target, **params):
    """PAIR's BlurIG on one channels-last image, gradients from torch."""
    def call_model(batch, call_model_args=None, expected_keys=None):
        t = torch.from_numpy(np.asarray(batch)).permute(0, 3, 1, 2).float().requires_grad_(True)
        grad = torch.autograd.grad(model(t)[:, target].sum(), t)[0]
        return {saliency.INPUT_OUTPUT_GRADIENTS: grad.permute(0, 2, 3, 1).numpy()}

    image = x[0].permute(1, 2, 0).numpy()
    mask = saliency.BlurIG().GetMask(image, call_model, **params)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32)).permute(2, 0, 1)[None]


@pytest.mark.parametrize("params", [{"max_sigma": 4, "steps": 8}, {"max_sigma": 3, "steps": 6, "sqrt": True}])
def test_equals_pair_saliency_on_a_classifier(digits, params):
    ours = esegeta.explain(digits.model, digits.x, "esegeta.BlurIG", target=3, **params)
    theirs = _upstream(copy.deepcopy(digits.model).eval(), digits.x, 3, **params)
    assert ours.shape == digits.x.shape
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5), (ours - theirs).abs().max()
    assert ours.abs().sum() > 0


def test_equals_pair_saliency_on_rgb(retina):
    """Three channels, blurred per channel (upstream's sigma [s, s, 0]); the retina model as a classifier of its
    summed vessel logit."""
    model = torch.nn.Sequential(copy.deepcopy(retina.model), torch.nn.Flatten(2)).eval()

    class Score(torch.nn.Module):
        def forward(self, x):
            return model(x).sum(-1)

    ours = esegeta.explain(Score(), retina.x, "esegeta.BlurIG", target=0, max_sigma=3, steps=5)
    theirs = _upstream(Score(), retina.x, 0, max_sigma=3, steps=5)
    # float32 blurs summed in different orders differ by ~1e-7, and the path's slope divides them by grad_step (0.01)
    assert (ours - theirs).abs().max() <= 1e-3 * theirs.abs().max(), (ours - theirs).abs().max()


def test_volume_blur_equals_scipy(tissue):
    for sigma in (0.7, 2.0):
        ours = gaussian_blur(tissue.x, sigma)
        theirs = ndimage.gaussian_filter(tissue.x[0, 0].numpy(), sigma=sigma, mode="constant")
        assert np.allclose(ours[0, 0].numpy(), theirs, atol=1e-5)


def test_batched_steps_equal_one_step_per_call(tissue):
    one = esegeta.explain(tissue.model, tissue.x, "esegeta.BlurIG", target=2, wrapper=tissue.wrapper, steps=4,
                          max_sigma=2, batch_size=1)
    four = esegeta.explain(tissue.model, tissue.x, "esegeta.BlurIG", target=2, wrapper=tissue.wrapper, steps=4,
                           max_sigma=2, batch_size=4)
    assert torch.allclose(one, four, rtol=1e-4, atol=1e-6)


def test_params_are_checked():
    with pytest.raises(ConfigError, match="not a positive number"):
        check_method("esegeta.BlurIG", {"max_sigma": 0}, None, None, "m")
    with pytest.raises(ConfigError, match="did you mean steps"):
        check_method("esegeta.BlurIG", {"step": 4}, None, None, "m")
