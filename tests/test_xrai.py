"""esegeta.XRAI: PAIR saliency's XRAI in torch, equal to ``saliency.core.XRAI`` on 2D inputs (its
Felzenszwalb regions); 3D over SLIC supervoxels.

Conformance (2D and 3D, classifier and wrapped segmenters) runs in test_conformance.py.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import esegeta
from esegeta.errors import ConfigError

saliency = pytest.importorskip("saliency.core")


def _upstream(model, x, target, algorithm="full", steps=8):
    def call_model(batch, call_model_args=None, expected_keys=None):
        # contiguous, as esegeta's own call: a channels-last view takes other convolution kernels, whose
        # rounding flips ReLUs at the constant baseline (1.3 % of the map on this CPU)
        t = torch.from_numpy(np.asarray(batch)).permute(0, 3, 1, 2).contiguous().float().requires_grad_(True)
        grad = torch.autograd.grad(model(t)[:, target].sum(), t)[0]
        return {saliency.INPUT_OUTPUT_GRADIENTS: grad.permute(0, 2, 3, 1).numpy()}

    parameters = saliency.XRAIParameters(steps=steps, algorithm=algorithm)
    out = saliency.XRAI().GetMaskWithDetails(x[0].permute(1, 2, 0).numpy(), call_model, extra_parameters=parameters)
    return torch.from_numpy(np.asarray(out.attribution_mask, dtype=np.float32))[None, None]


@pytest.mark.parametrize("algorithm", ["full", "fast"])
def test_equals_upstream_on_a_2d_classifier(retina, algorithm):
    model = torch.nn.Sequential(copy.deepcopy(retina.model), torch.nn.Flatten(2)).eval()

    class Score(torch.nn.Module):
        def forward(self, x):
            return model(x).sum(-1)

    ours = esegeta.explain(Score(), retina.x, "esegeta.XRAI", target=0, steps=8, algorithm=algorithm)
    theirs = _upstream(Score(), retina.x, 0, algorithm)
    assert ours.shape == (1, 1, *retina.x.shape[2:])
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max(), (ours - theirs).abs().max()
    assert ours.unique().numel() > 1


def test_volume_regions_rank_the_wrapped_target(tissue):
    attr = esegeta.explain(tissue.model, tissue.x, "esegeta.XRAI", target=2, wrapper=tissue.wrapper, steps=4,
                           dilation_rad=1, min_pixel_diff=4)
    assert attr.shape == (1, 1, *tissue.x.shape[2:]) and torch.isfinite(attr).all()
    assert 1 < attr.unique().numel() < attr.numel() / 4  # constant per region


def test_algorithm_is_checked(digits):
    with pytest.raises(ConfigError, match="params.algorithm"):
        esegeta.explain(digits.model, digits.x, "esegeta.XRAI", target=3, algorithm="greedy", steps=2)
