"""esegeta.CRP: zennit-crp's channel-concept conditional attribution on zennit >= 0.5 (zennit-crp 0.6 pins
zennit<=0.4.6 and cannot be installed beside esegeta). Unconditioned it is zennit's own LRP; a layer's
channel conditions add up to the layer conditioned on all of them; top concepts and references in the extras.
"""
from __future__ import annotations

import copy

import pytest
import torch

import esegeta
from esegeta.compat import import_torchvision
from esegeta.errors import ConfigError


def _zennit(model, x, target):
    import_torchvision()
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    model = copy.deepcopy(model).eval()
    with Gradient(model, EpsilonPlusFlat()) as attributor:
        out, rel = attributor(x, lambda o: o * torch.eye(o.shape[1])[[target]])
    return rel.sum(1, keepdim=True)


def test_unconditioned_equals_zennit_lrp(digits):
    ours = esegeta.explain(digits.model, digits.x, "esegeta.CRP", target=3)
    assert torch.allclose(ours, _zennit(digits.model, digits.x, 3), atol=1e-5)


def test_channel_conditions_add_up(digits):
    everything = esegeta.explain(digits.model, digits.x, "esegeta.CRP", target=3, conditions={"layer2": list(range(32))})
    parts = [esegeta.explain(digits.model, digits.x, "esegeta.CRP", target=3, conditions={"layer2": [c]})
             for c in range(0, 32, 4)]
    rest = esegeta.explain(digits.model, digits.x, "esegeta.CRP", target=3,
                           conditions={"layer2": [c for c in range(32) if c % 4]})
    assert torch.allclose(sum(parts) + rest, everything, atol=1e-5)
    assert not torch.allclose(parts[0], everything, atol=1e-3)
    assert torch.allclose(everything, _zennit(digits.model, digits.x, 3), atol=1e-5)  # one path through layer2


def test_top_concepts_and_references_from_the_run_inputs(digits):
    from esegeta.attribution.explainer import run
    from esegeta.attribution.prepare import prepared
    from esegeta.spec.request import from_arguments

    x = torch.cat([digits.x, digits.x.flip(-1), digits.x * 0.5])
    request = from_arguments("esegeta.CRP", target=3, params={"record_layers": ["layer1"], "top_k": 3})
    extras = run(request, prepared(digits.model, x[:1]), x[:1], samples=x).extras
    concepts, references = extras["concepts"]["layer1"], extras["references"]["layer1"]
    assert concepts.shape == (1, 2, 3) and references.shape == (1, 3)  # per explained input: its top 3
    assert concepts[0, 1, 0] >= concepts[0, 1, 1] >= concepts[0, 1, 2]
    assert set(references[0].tolist()) <= {0, 1, 2}


def test_3d_wrapped_segmenter(tissue):
    attr = esegeta.explain(tissue.model, tissue.x, "esegeta.CRP", target=2, wrapper=tissue.wrapper,
                           conditions={"enc2": [0, 1]})
    assert attr.shape == (1, 1, *tissue.x.shape[2:]) and torch.isfinite(attr).all() and attr.abs().sum() > 0


def test_bad_conditions_are_refused(digits):
    with pytest.raises(ConfigError, match="params.conditions"):
        esegeta.explain(digits.model, digits.x, "esegeta.CRP", target=3, conditions={"layer2": []})
    with pytest.raises(ConfigError, match="did you mean layer2"):
        esegeta.explain(digits.model, digits.x, "esegeta.CRP", target=3, conditions={"layer22": [0]})
    with pytest.raises(ConfigError, match="did you mean EpsilonPlusFlat"):
        esegeta.explain(digits.model, digits.x, "esegeta.CRP", target=3, composite="EpsilonPlusFlatt")
