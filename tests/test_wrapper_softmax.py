"""DeepLIFT through the ``multiclass`` wrapper's softmax: the summation to delta holds.

The wrapper esegeta puts around a segmenter applies ``nn.Softmax`` over the classes before the
masked sum. Captum's and SHAP's DeepLIFT give ``nn.Softmax`` an elementwise rescale, which is not
exact for a softmax (each output depends on every class): Σ relevance was 2.5× f(x) − f(b) on a
MONAI SegResNet of the usual depth. While DeepLIFT runs, the wrapper's softmax becomes
:class:`esegeta.attribution.rules.PairedSoftmax` (the exact multiplier the substitutes give the
softmax inside attention), undone afterwards.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import esegeta
import zoo_models
from conftest import assert_unchanged, hook_count, snapshot
from esegeta.attribution import wrappers
from esegeta.attribution.prepare import prepared
from esegeta.attribution.rules import PairedSoftmax, substituted

SOFTMAX = {"name": "multiclass", "activation": "softmax"}


def plain_segmenter() -> nn.Module:
    """A 3D convolutional segmenter without normalisation or attention (no other substitute applies)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv3d(6, 3, 1)).eval()


def _models():
    """name → (model, input, target): targets whose frozen mask is not empty."""
    z = zoo_models.segresnet()
    x = torch.rand(1, 1, 12, 12, 12, generator=torch.Generator().manual_seed(2))
    return {"plain": (plain_segmenter(), x, 0), "segresnet": (z.model, z.x, 1)}


def _delta(model, x, target) -> float:
    forward = wrappers.build(model, x, SOFTMAX)
    with torch.no_grad():
        return float(forward(x)[0, target] - forward(torch.zeros_like(x))[0, target])


@pytest.mark.parametrize("name", ("plain", "segresnet"))
@pytest.mark.parametrize("method", ("captum.DeepLift", "captum.DeepLiftShap"))
def test_deeplift_sums_to_delta_through_the_wrappers_softmax(name, method):
    model, x, target = _models()[name]
    delta = _delta(model, x, target)
    assert abs(delta) > 1  # measured: −1.42 (plain), 687 (SegResNet)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attr = esegeta.explain(model, x, method, target=target, wrapper=SOFTMAX,
                               **({"baselines": torch.zeros(2, *x.shape[1:])} if method.endswith("Shap") else {}))
    assert abs(float(attr.double().sum()) - delta) <= 2e-3 * abs(delta)
    assert_unchanged(model, before)
    assert hook_count(prepared(model, x)) == 0


def test_the_wrappers_softmax_is_swapped_only_while_deeplift_runs():
    model, x, _ = _models()["plain"]
    ready = prepared(model, x)
    forward = wrappers.build(ready, x, SOFTMAX)
    softmax = forward.score.activation
    pair = torch.cat([x, x * 0.3])
    with torch.no_grad():
        expected = forward(pair)
    with substituted(ready, x, forward=forward) as changes:  # LRP: the wrapper's softmax left alone
        assert forward.score.activation is softmax and not changes
    with substituted(ready, x, pairs=True, forward=forward) as changes:
        assert isinstance(forward.score.activation, PairedSoftmax)
        assert any("PairedSoftmax" in c for c in changes)
        with torch.no_grad():
            assert torch.allclose(forward(pair), expected, rtol=1e-6, atol=1e-6)
    assert forward.score.activation is softmax


def test_an_empty_target_mask_cannot_be_checked_rather_than_failing_conservation():
    """Zennit's composites seed the target column with 1: where the target's frozen mask is empty
    (score 0) the seed reaches no input. Before: "conservation does not hold: Σ relevance is 0×
    the output seed"; now the check says it cannot be made, as for a zero score elsewhere."""
    model, x, _ = _models()["plain"]  # class 1 is predicted nowhere
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attr = esegeta.explain(model, x, "zennit.EpsilonPlus", target=1, wrapper=SOFTMAX)
    said = [str(w.message) for w in caught if "conservation" in str(w.message)]
    assert float(attr.abs().sum()) == 0
    assert said and all("cannot be checked" in s for s in said), said
