"""Conformance: every registered method on every sample it applies to.

New registry entries are picked up here with no test edits: the result must be finite,
have the documented shape for the method's kind, leave no hook on the prepared copy and
leave the user's model untouched.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import esegeta
from esegeta import registry
from esegeta.prepare import prepared

from conftest import CASES, assert_unchanged, hook_count, snapshot

METHODS = sorted(registry.all_methods())


def _params(spec, x, case, layer):
    params = {k: (v(x) if callable(v) else v) for k, v in spec.quick_params.items()}
    if spec.kind == "neuron":
        params["neuron_selector"] = _most_active_neuron(case.model, x, layer)
    return params


def _most_active_neuron(model, x, layer):
    """Index (without batch) of the layer's most active output: an inactive one has zero gradient."""
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    out = seen[0]
    return [int(i) for i in torch.unravel_index(out.argmax(), out.shape)]


def _layer_output_shape(model, x, layer):
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("method_id", METHODS)
def test_method_conforms(method_id, case):
    spec = registry.get(method_id)
    if case.dims not in spec.dims:
        pytest.skip(f"{method_id} does not support {case.dims}D")
    if case.task not in spec.tasks:
        pytest.skip(f"{method_id} does not apply to {case.task} models")
    layer = (case.leaf_layer if spec.leaf_layer else case.layer) if spec.needs_layer else None
    before = snapshot(case.model)
    torch.manual_seed(0)
    np.random.seed(0)
    attr = esegeta.explain(case.model, case.x, method_id, target=case.target if spec.needs_target else None,
                           wrapper=case.wrapper, layer=layer,
                           **_params(spec, case.x, case, layer))
    assert attr.dtype == torch.float32
    assert torch.isfinite(attr).all()
    assert attr.abs().sum() > 0, "an all-zero result explains nothing"
    if spec.kind in ("attribution", "neuron"):  # one map per input channel, or one for all
        assert attr.shape[:1] + attr.shape[2:] == case.x.shape[:1] + case.x.shape[2:]
        assert attr.shape[1] in (case.x.shape[1], 1)
    elif spec.kind == "image":  # an image of its own: batch kept, same rank as the input
        assert attr.shape[0] == case.x.shape[0] and attr.ndim == case.x.ndim
    else:
        layer_shape = _layer_output_shape(case.model, case.x, layer)
        assert attr.shape[0] == case.x.shape[0]
        assert attr.shape[2:] == layer_shape[2:]
        assert attr.shape[1] in (layer_shape[1], 1)
    assert_unchanged(case.model, before)
    assert hook_count(prepared(case.model, case.x)) == 0, "hooks left on the prepared copy"


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize("method_id,layer", [("captum.Saliency", None), ("captum.IntegratedGradients", None),
                                             ("captum.LayerGradCam", "layer2")])
def test_noise_tunnel(digits, method_id, layer, nt_type):
    nt = {"nt_type": nt_type, "nt_samples": 4, "stdevs": 0.1}
    torch.manual_seed(0)
    params = {"n_steps": 8} if method_id == "captum.IntegratedGradients" else {}
    attr = esegeta.explain(digits.model, digits.x, method_id, target=3, layer=layer, noise_tunnel=nt, **params)
    torch.manual_seed(0)
    plain = esegeta.explain(digits.model, digits.x, method_id, target=3, layer=layer, **params)
    assert torch.isfinite(attr).all() and attr.shape == plain.shape
    assert not torch.allclose(attr, plain), "the noise tunnel changed nothing"


def test_registry_lists_every_captum_method():
    wanted = """Saliency InputXGradient IntegratedGradients DeepLift DeepLiftShap GradientShap GuidedBackprop
    Deconvolution GuidedGradCam FeatureAblation Occlusion ShapleyValueSampling KernelShap Lime LRP LayerActivation
    LayerConductance LayerGradCam LayerGradientShap LayerGradientXActivation LayerDeepLift LayerDeepLiftShap
    LayerIntegratedGradients LayerFeatureAblation LayerLRP InternalInfluence NeuronGuidedBackprop NeuronGradient
    NeuronIntegratedGradients""".split()
    assert {f"captum.{n}" for n in wanted} <= set(METHODS)
    for row in esegeta.methods():
        assert row["available"], row


def test_every_case_is_covered():
    assert set(CASES) == {"digits", "retina2d", "tissue3d"}
