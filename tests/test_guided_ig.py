"""esegeta.GuidedIG: PAIR saliency's Guided IG in torch, N-d. Upstream (0.2.1) calls
``np.quantile(..., interpolation='lower')``, which NumPy 2 removed: it is compared here with
upstream's own source run with that one keyword spelled as NumPy 2 spells it (``method='lower'``).

Conformance (2D and 3D, classifier and wrapped segmenters) runs in test_conformance.py.
"""
from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch

import esegeta
from esegeta.errors import ConfigError

saliency = pytest.importorskip("saliency.core")


def _upstream_on_numpy2():
    """saliency.core.guided_ig with NumPy 2's spelling of the quantile keyword, nothing else changed."""
    import saliency.core.guided_ig as module

    source = inspect.getsource(module)
    assert source.count("interpolation='lower'") == 1
    namespace = {"__name__": "saliency.core.guided_ig_numpy2", "__package__": "saliency.core"}
    exec(compile(source.replace("interpolation='lower'", "method='lower'"), module.__file__, "exec"), namespace)
    return namespace["GuidedIG"]


def test_upstream_fails_on_numpy_2():
    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("NumPy 1 still takes interpolation=")
    with pytest.raises(TypeError, match="interpolation"):
        saliency.GuidedIG().GetMask(np.ones((4, 4, 1), np.float32), lambda b, call_model_args=None, expected_keys=None:
                                    {saliency.INPUT_OUTPUT_GRADIENTS: np.asarray(b) * 2.0}, x_steps=2)


@pytest.mark.parametrize("params", [{"x_steps": 10}, {"x_steps": 6, "fraction": 0.5, "max_dist": 0.1}])
def test_equals_upstream(digits, params):
    model = copy.deepcopy(digits.model).eval()

    def call_model(batch, call_model_args=None, expected_keys=None):
        t = torch.from_numpy(np.asarray(batch)).permute(0, 3, 1, 2).float().requires_grad_(True)
        grad = torch.autograd.grad(model(t)[:, 3].sum(), t)[0]
        return {saliency.INPUT_OUTPUT_GRADIENTS: grad.permute(0, 2, 3, 1).numpy()}

    theirs = _upstream_on_numpy2()().GetMask(digits.x[0].permute(1, 2, 0).numpy(), call_model, **params)
    theirs = torch.from_numpy(np.asarray(theirs)).permute(2, 0, 1)[None].float()
    ours = esegeta.explain(digits.model, digits.x, "esegeta.GuidedIG", target=3, **params)
    assert ours.shape == digits.x.shape
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (ours - theirs).abs().max()
    assert ours.abs().sum() > 0


def test_volume_sums_towards_the_score_difference(tissue):
    """Guided IG is a path method: its sum approaches F(x) - F(baseline) as steps grow (3D, wrapped)."""
    from esegeta.attribution import wrappers
    from esegeta.attribution.prepare import prepared

    attr = esegeta.explain(tissue.model, tissue.x, "esegeta.GuidedIG", target=2, wrapper=tissue.wrapper,
                           x_steps=16)
    forward = wrappers.build(prepared(tissue.model, tissue.x), tissue.x, dict(tissue.wrapper), None)
    with torch.no_grad():
        delta = float(forward(tissue.x)[0, 2] - forward(torch.zeros_like(tissue.x))[0, 2])
    assert abs(float(attr.sum()) - delta) < 0.2 * abs(delta)


def test_bad_baseline_is_refused(digits):
    with pytest.raises(ConfigError, match="x_baseline"):
        esegeta.explain(digits.model, digits.x, "esegeta.GuidedIG", target=3, x_baseline="zeros", x_steps=2)
