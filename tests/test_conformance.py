"""Conformance: every registered method on every sample it applies to.

New registry entries are picked up here with no test edits: the result must be finite,
have the documented shape for the method's kind, leave no hook on the prepared copy and
leave the user's model untouched; and its adapter's table must state the method's facts
(cost formula, batch layout, axiom), which nothing else lists by method id.

Every case runs on the CPU, and on CUDA where there is one (marker ``cuda``: ``make
test-cuda``, ``scripts/gpu_lane.sh``). There the result must also agree with the CPU's:
Pearson r >= 0.99 (in full fp32, TF32 off), except for methods that draw random numbers
(torch's streams differ per device): for those only finiteness and shape are checked. A
method draws random numbers when its CPU result changes with the seed (torch's, numpy's
and Python's, all seeded): noise tunnels, sampling, random masks or initial images
(KernelShap, GradientShap, lucent...), or when upstream seeds a generator of its own (a
``seed``-like parameter: RISE draws its masks on the input's device from its ``seed``,
LIME, SHAP's GradientExplainer). That is measured rather than listed, so it holds for new
entries too, and a method that only *may* draw (what
the spec's ``uses_global_rng`` conservatively says, e.g. of every own method)
is still compared.
"""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

import esegeta
from esegeta.spec import cost, registry
from esegeta.attribution.prepare import prepared

from conftest import CASES, assert_unchanged, hook_count, snapshot

METHODS = sorted(registry.all_methods())
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the GPU lane (make test-cuda, "
                                                             "scripts/gpu_lane.sh) runs it"),
])]
#: Pearson r a CUDA result must reach against the CPU's, for a method that draws no random numbers.
MIN_R = 0.99
#: Methods bound to an architecture no sample has (LeGrad: a torchvision ViT's blocks), and the test
#: file that runs them on one; here they must be refused by their pre-flight check, before the run.
ARCHITECTURE_BOUND = {"torchcam.LeGrad": "tests/test_torchcam.py"}
#: Upstream parameters that seed a generator of the method's own.
SEED_PARAMS = frozenset({"seed", "rseed", "random_state", "random_seed", "generator"})


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


def _explain(spec, case, layer, model, x, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return esegeta.explain(model, x, spec.id, target=case.target if spec.needs_target else None,
                           wrapper=case.wrapper, layer=layer, **_params(spec, case.x, case, layer))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson's r of two maps (1.0 for two equal constant maps, 0.0 for a constant and another)."""
    a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    a, b = a - a.mean(), b - b.mean()
    norm = float(a.norm() * b.norm())
    if norm == 0:
        return 1.0 if torch.allclose(a, b) else 0.0
    return float((a * b).sum()) / norm


def layer_of(spec, case) -> str | None:
    return case.layer_for(spec)


def on_device(spec, case, device: str) -> tuple[torch.Tensor, torch.nn.Module, torch.Tensor]:
    """(result, model, input): the method on a copy of the case's model and input on ``device``
    (the case's own on the CPU), in full fp32 (TF32 off)."""
    from esegeta.attribution.numerics import fp32_numerics

    model, x = (case.model, case.x) if device == "cpu" else (copy.deepcopy(case.model).to(device), case.x.to(device))
    with fp32_numerics(tf32=False):
        attr = _explain(spec, case, layer_of(spec, case), model, x)
    assert attr.device == x.device, "explain returns its result on the input's device"
    return attr, model, x


def agreement_with_cpu(spec, case, attr: torch.Tensor) -> tuple[float, bool]:
    """(Pearson r of ``attr``, computed on another device, with the CPU result; whether the
    method draws random numbers: its CPU result changes with the seed, so the devices' streams
    make the results differ and r says little)."""
    if spec.kind == "image":  # feature visualisation optimises a random image (lucent: on cuda:0 where CUDA is)
        return float("nan"), True
    reference = _explain(spec, case, layer_of(spec, case), case.model, case.x)
    assert attr.shape == reference.shape
    draws = (bool(SEED_PARAMS & set(spec.adapter.parameters(spec)))
             or not torch.equal(reference, _explain(spec, case, layer_of(spec, case), case.model, case.x, seed=1)))
    return pearson(attr, reference), draws


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method_id", METHODS)
def test_method_conforms(method_id, case, device):
    spec = registry.get(method_id)
    if case.dims not in spec.dims:
        pytest.skip(f"{method_id} does not support {case.dims}D")
    if case.task not in spec.tasks:
        pytest.skip(f"{method_id} does not apply to {case.task} models")
    layer = layer_of(spec, case)
    if method_id in ARCHITECTURE_BOUND:
        from esegeta.errors import ConfigError

        with pytest.raises(ConfigError, match="cannot run on this model"):
            _explain(spec, case, layer, case.model, case.x)
        pytest.skip(f"{method_id} needs another architecture: {ARCHITECTURE_BOUND[method_id]} runs it")
    before = snapshot(case.model)
    attr, model, x = on_device(spec, case, device)
    if device != "cpu":
        r, draws = agreement_with_cpu(spec, case, attr)  # random numbers: finiteness and shape only
        assert draws or r >= MIN_R, f"{device} and CPU disagree: Pearson r = {r:.4f} < {MIN_R}"
        attr = attr.cpu()
    assert attr.dtype == torch.float32
    assert torch.isfinite(attr).all()
    assert attr.abs().sum() > 0, "an all-zero result explains nothing"
    if spec.kind in ("attribution", "neuron"):  # one map per input channel, or one for all
        assert attr.shape[:1] + attr.shape[2:] == case.x.shape[:1] + case.x.shape[2:]
        assert attr.shape[1] in (case.x.shape[1], 1)
    elif spec.kind == "image":  # an image of its own: batch kept, same rank as the input
        assert attr.shape[0] == case.x.shape[0] and attr.ndim == case.x.ndim
    else:
        # a method that fuses several layers returns its map on the finest of their grids
        layer_shape = max((_layer_output_shape(case.model, case.x, name) for name in registry.layer_names(layer)),
                          key=lambda shape: shape[2:].numel())
        assert attr.shape[0] == case.x.shape[0]
        assert attr.shape[2:] == layer_shape[2:]
        assert attr.shape[1] in (layer_shape[1], 1)
    assert_unchanged(case.model, before)
    assert hook_count(prepared(model, x)) == 0, "hooks left on the prepared copy"


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


@pytest.mark.parametrize("method_id", METHODS)
def test_method_states_its_facts(method_id):
    """Its cost formula (answering a Passes for an input of each dimensionality it takes, from shapes
    alone), its batch layout and its axiom, stated in its adapter's table."""
    spec = registry.get(method_id)
    assert callable(spec.passes), f"{method_id}: state passes (its cost formula) in its adapter's table"
    assert spec.batch_layout in registry.BATCH_LAYOUTS, f"{method_id}: batch_layout {spec.batch_layout!r}"
    assert spec.axiom and spec.axiom in registry.AXIOMS, f"{method_id}: axiom {spec.axiom!r} (or 'none')"
    for dims in spec.dims:
        x = torch.empty(1, 3, *[16] * dims, device="meta")
        passes = spec.passes(cost.resolved_values(spec, {}, x), x, None)
        assert isinstance(passes, cost.Passes), passes
        assert passes.forward is None or passes.forward >= 1


def test_a_method_without_its_facts_is_not_registered():
    spec = registry.get("captum.Saliency")
    bare = registry.MethodSpec("captum", "NoFacts", spec.kind, spec.adapter)
    with pytest.raises(ValueError, match="captum.NoFacts: state in its adapter's table .*passes.*batch_layout.*axiom"):
        registry.register(bare)
    assert "captum.NoFacts" not in registry.all_methods()


def test_no_method_id_outside_the_adapters_tables():
    """The facts live on the specs: cost, batching and the axiom notes key no table by method id."""
    from pathlib import Path

    from esegeta.attribution import architectures, batching

    for module in (cost, batching, architectures):
        source = Path(module.__file__).read_text(encoding="utf-8")
        named = [m for m in METHODS if f'"{m}"' in source or f"'{m}'" in source]
        assert not named, f"{module.__name__} names {named}: state the fact in the method's adapter table"
    assert set(architectures.RULE_AXIOMS) <= set(registry.AXIOMS)


def test_every_case_is_covered():
    assert set(CASES) == {"digits", "retina2d", "tissue3d"}
