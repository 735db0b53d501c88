"""A zoo of architectures nobody here wrote (tests/zoo_models.py): torchvision and MONAI at small sizes.

The CI subset below is generated from the registry: a few models, one method per family of
each library (the full matrix is ``benchmarks/zoo.py``). Every cell must either run (finite,
not all zero, the user's model untouched) or be refused before the run by
:func:`esegeta.attribution.architectures.refusals` with the offending layer named; a failure after no
refusal fails the test. Also: the regressions of the bugs these models found, IG
completeness and DeepLift summation per family.
"""
from __future__ import annotations

import pytest
import torch

import esegeta
from esegeta.attribution import architectures
from esegeta.spec import registry
from esegeta.errors import ConfigError
from esegeta.attribution.prepare import prepare, prepared

from conftest import assert_unchanged, hook_count, snapshot

pytest.importorskip("monai")
from zoo_models import ZOO, method_params  # noqa: E402

_models: dict = {}


def zoo(name: str):
    if name not in _models:
        _models[name] = ZOO[name]()
    return _models[name]


#: The CI subset: models × one method per family of every library (cheap quick params).
CI_MODELS = ("resnet18", "densenet121", "vit", "unet2d", "dynunet")
CI_FAMILIES = ("captum.IntegratedGradients", "captum.DeepLift", "captum.LRP", "captum.LayerGradCam",
               "gradcam.GradCAM", "zennit.EpsilonPlus", "shap.GradientExplainer")


def _layer(spec, z):
    return (z.leaf_layer if spec.leaf_layer else z.layer) if spec.needs_layer else None


def _params(spec, z):
    params = {k: (v(z.x) if callable(v) else v) for k, v in spec.quick_params.items()}
    if z.reshape_transform and "reshape_transform" in spec.adapter.parameters(spec):
        params["reshape_transform"] = z.reshape_transform
    return params | method_params(spec.id, z)


@pytest.mark.parametrize("method_id", CI_FAMILIES)
@pytest.mark.parametrize("model", CI_MODELS)
def test_cell_runs_or_is_refused_before_the_run(model, method_id):
    z, spec = zoo(model), registry.get(method_id)
    if z.dims not in spec.dims or z.task not in spec.tasks:
        pytest.skip("not applicable")
    layer, params = _layer(spec, z), _params(spec, z)
    reasons = architectures.refusals(spec, prepared(z.model, z.x), z.x, layer=layer, params=params, wrapper=z.wrapper)
    if reasons:  # refused: explain refuses too, with the same reason, and names a layer or the fix
        assert all(" " in r and ("use " in r or "set " in r or "choose " in r) for r in reasons), reasons
        with pytest.raises(ConfigError, match="cannot run on this model"):
            esegeta.explain(z.model, z.x, method_id, target=z.target if spec.needs_target else None,
                            wrapper=z.wrapper, layer=layer, **params)
        return
    before = snapshot(z.model)
    torch.manual_seed(0)
    attr = esegeta.explain(z.model, z.x, method_id, target=z.target if spec.needs_target else None,
                           wrapper=z.wrapper, layer=layer, **params)
    assert torch.isfinite(attr).all()
    assert attr.abs().sum() > 0
    assert_unchanged(z.model, before)
    assert hook_count(prepared(z.model, z.x)) == 0


# ---------------------------------------------------------------------------- regressions

def test_dynunet_after_a_training_step_is_copied_and_its_aliases_resolved():
    z = zoo("dynunet")  # deep supervision: graph tensors in .heads after a training step
    ready = prepare(z.model, z.x)
    assert any("autograd graph" in c for c in ready.changes)
    assert any("alias of" in c for c in ready.changes)
    names = [n for n, _ in ready.model.named_modules()]
    modules = [m for _, m in ready.model.named_modules(remove_duplicate=False)]
    assert len(modules) == len({id(m) for m in modules}) == len(names), "a module is still registered twice"
    with torch.no_grad():
        assert torch.allclose(ready(z.x), z.model.eval()(z.x))


def test_in_place_residual_addition_runs_under_deep_explainer():
    z = zoo("resnet18")  # out += identity in BasicBlock: "a view ... modified inplace" before
    torch.manual_seed(0)
    attr = esegeta.explain(z.model, z.x, "captum.DeepLift", target=0)
    assert torch.isfinite(attr).all()
    from esegeta.attribution.prepare import _OutOfPlace

    leaf = torch.ones(2, requires_grad=True)
    a, b = leaf * 1, torch.ones(2)  # recorded by autograd: what hooks trip on
    kept = a
    with _OutOfPlace() as mode:
        a += b  # rebinding: computed out of place
        kept.mul_(3)  # a statement relying on its side effect: left in place
        c, d = torch.ones(2), torch.ones(2)
        c += d  # outside autograd: left in place
    assert mode.rewritten == 1 and torch.equal(a.detach(), torch.full((2,), 2.0))
    assert torch.equal(kept.detach(), torch.full((2,), 3.0)) and torch.equal(c, torch.full((2,), 2.0))


def test_zennit_folds_batch_norm_along_the_graph_on_densenet():
    z = zoo("densenet121")  # SequentialMergeBatchNorm pairs by module order: wrong across torch.cat
    pairs = architectures.linear_norm_pairs(z.model, z.x)
    names = {id(m): n for n, m in z.model.named_modules()}
    assert ("features.conv0", "features.norm0") in [(names[id(a)], names[id(b)]) for a, b in pairs]
    assert all(not names[id(b)].endswith("norm1") for _, b in pairs), "a norm after torch.cat was folded"
    attr = esegeta.explain(z.model, z.x, "zennit.EpsilonPlus", target=0)
    assert torch.isfinite(attr).all() and attr.abs().sum() > 0


def test_failed_lrp_leaves_nothing_on_the_cached_copy():
    z = zoo("resnet18")
    ready = prepared(z.model, z.x)
    with pytest.raises((IndexError, RuntimeError)):
        esegeta.explain(z.model, z.x, "captum.LRP", target=99)  # fails inside Captum (index out of range)
    assert not [n for n, m in ready.model.named_modules() if hasattr(m, "rule")]
    attr = esegeta.explain(z.model, z.x, "captum.LayerLRP", target=0, layer=z.leaf_layer)
    assert torch.isfinite(attr).all()


def _manual_grad_cam_on_tokens(z):
    """Grad-CAM on the ViT's patch tokens by hand: feature weights = the gradient averaged over patches."""
    layer = z.model.get_submodule(z.layer)
    kept = []
    handle = layer.register_forward_hook(lambda m, i, o: kept.append(o))
    try:
        out = z.model(z.x)
        tokens = kept[-1]
        grad, = torch.autograd.grad(out[0, z.target], tokens)
    finally:
        handle.remove()
    patches, g = tokens[:, 1:].detach(), grad[:, 1:]
    weights = g.mean(dim=1, keepdim=True)  # (1, 1, D)
    side = round(patches.shape[1] ** 0.5)
    return (patches * weights).sum(-1).reshape(1, 1, side, side)


def test_vit_token_layer_is_explained_on_its_grid():
    z = zoo("vit")  # tokens (1, 17, 16): a class token and a 4x4 grid
    assert architectures.token_layout((1, 17, 16), 2) == "vit"
    assert architectures.token_layout((1, 16, 8), 2) == "tokens"
    assert architectures.token_layout((1, 15, 8), 2) is None and architectures.token_layout((1, 8, 4, 4), 2) is None
    expected = _manual_grad_cam_on_tokens(z)
    cam = esegeta.explain(z.model, z.x, "captum.LayerGradCam", target=0, layer=z.layer)  # a (1, 1, 17) map before
    assert cam.shape == (1, 1, 4, 4)
    assert torch.allclose(cam, expected, atol=1e-6, rtol=1e-4)
    # grad-cam: reshape_transform filled in (refused before); equal to the explicit one
    auto = esegeta.explain(z.model, z.x, "gradcam.GradCAM", target=0, layer=z.layer)
    explicit = esegeta.explain(z.model, z.x, "gradcam.GradCAM", target=0, layer=z.layer, reshape_transform="vit")
    assert auto.shape == (1, 1, 32, 32) and torch.equal(auto, explicit) and auto.abs().sum() > 0
    for method in ("gradcam.ShapleyCAM", "torchray.grad_cam"):
        out = esegeta.explain(z.model, z.x, method, target=0, layer=z.layer)
        assert torch.isfinite(out).all() and out.abs().sum() > 0, method
    assert hook_count(prepared(z.model, z.x)) == 0


def test_torchray_layer_methods_run_where_the_model_modifies_the_layer_output_in_place():
    z = zoo("densenet121")  # F.relu(features, inplace=True) on the probe's leaf tensor: refused before
    ray = esegeta.explain(z.model, z.x, "torchray.grad_cam", target=0, layer="features")
    captum = esegeta.explain(z.model, z.x, "captum.LayerGradCam", target=0, layer="features")
    assert torch.allclose(ray, captum.clamp(min=0), atol=1e-6)
    assert hook_count(prepared(z.model, z.x)) == 0


def test_deep_explainer_is_refused_at_a_product_of_two_data_dependent_paths():
    z = zoo("efficientnet_b0")  # squeeze-excitation: its additivity check failed after the run
    gates = architectures.products(z.model, z.x)
    assert gates and all("SqueezeExcitation" in g for g in gates)
    assert architectures.products(zoo("resnet18").model, zoo("resnet18").x) == []
    reasons = architectures.refusals(registry.get("shap.DeepExplainer"), prepared(z.model, z.x), z.x)
    assert any("features.1.0.block.1 (SqueezeExcitation)" in r and "captum.DeepLift" in r for r in reasons)
    notes = architectures.axiom_notes(registry.get("captum.DeepLift"), z.model, z.x)
    assert any("SqueezeExcitation" in n and "summation to delta" in n for n in notes)


def test_patternnet_on_resnet_projects_at_residual_blocks():
    from esegeta.adapters.own import _fit_quick

    z = zoo("resnet18")  # overflowed float32 with and without project_bottlenecks
    fit = _fit_quick(z.x)
    projected = esegeta.explain(z.model, z.x, "esegeta.PatternNet", target=0, fit_inputs=fit, project_bottlenecks=True)
    default = esegeta.explain(z.model, z.x, "esegeta.PatternNet", target=0, fit_inputs=fit)  # overflows: projected
    assert torch.isfinite(projected).all() and projected.abs().sum() > 0
    assert torch.allclose(default, projected)


def test_zennit_rule_map_overflow_names_the_stabiliser():
    import warnings

    from esegeta.attribution.explainer import AxiomWarning

    z = zoo("swinunetr")  # zennit's default epsilon (1e-6) everywhere: all-NaN maps recorded ok before
    tiny = {"Convolution": "epsilon", "Linear": "epsilon", "Activation": "pass"}
    # since the wrapper's masked sum has its rule, the relevance (~1e37) may stay under float32's
    # maximum: then the conservation check says it is not the seed's 1; over it, the overflow error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            esegeta.explain(z.model, z.x, "zennit.LayerMapComposite", target=0, wrapper=z.wrapper, layer_map=tiny)
        except FloatingPointError as exc:
            assert "epsilon" in str(exc)
        else:
            assert any(issubclass(w.category, AxiomWarning) and "conservation does not hold" in str(w.message)
                       for w in caught)
    quick = registry.get("zennit.LayerMapComposite").quick_params["layer_map"]  # epsilon 0.25
    relevance = esegeta.explain(z.model, z.x, "zennit.LayerMapComposite", target=0, wrapper=z.wrapper, layer_map=quick)
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0


def test_shapley_cam_keeps_its_map_on_a_3d_unet():
    z = zoo("unet2d")  # clean-up raised "Can't detach views in-place" and lost the map
    cam = esegeta.explain(z.model, z.x, "gradcam.ShapleyCAM", target=0, wrapper=z.wrapper, layer=z.layer)
    assert torch.isfinite(cam).all()


def test_patternnet_overflow_message_does_not_repeat_advice_already_followed():
    from esegeta.algorithms import patterns

    assert "even with project_bottlenecks" in open(patterns.__file__, encoding="utf-8").read()
    z = zoo("unet2d")
    assert architectures.refusals(registry.get("esegeta.PatternNet"), prepared(z.model, z.x), z.x)


# ---------------------------------------------------------------------------- axioms per family

def _relative_gap(z, method, **params):
    from esegeta.spec.request import WrapperConfig
    from esegeta.attribution.wrappers import build

    ready = prepared(z.model, z.x)
    forward = ready if z.wrapper is None else build(ready, z.x, WrapperConfig(**z.wrapper), None)
    with torch.no_grad():
        delta = float(forward(z.x)[0, z.target] - forward(torch.zeros_like(z.x))[0, z.target])
    attr = esegeta.explain(z.model, z.x, method, target=z.target, wrapper=z.wrapper, **params)
    return abs(float(attr.double().sum()) - delta) / abs(delta)


@pytest.mark.parametrize("model,bound", [("resnet18", 1e-4), ("efficientnet_b0", None)])
def test_deeplift_sums_to_delta(model, bound):
    """Exact where every nonlinearity has a rule (resnet18: ReLU, max pooling); EfficientNet's SiLU now
    has the rescale rule, its squeeze-excitation gate (a product of two paths) has none: not exact."""
    gap = _relative_gap(zoo(model), "captum.DeepLift")
    if bound is not None:
        assert gap < bound, gap
    else:
        assert gap < 1.0, gap


@pytest.mark.parametrize("model,steps,bound", [("efficientnet_b0", 64, 1e-3), ("unet2d", 256, 1e-2)])
def test_integrated_gradients_completeness(model, steps, bound):
    assert _relative_gap(zoo(model), "captum.IntegratedGradients", n_steps=steps) < bound


# ---------------------------------------------------------------------------- check predicts the run

FACTORY = '''
import sys
sys.path.insert(0, {tests!r})
from zoo_models import ZOO


def build():
    return ZOO[{name!r}]().model
'''


def test_check_and_validate_refuse_what_cannot_run_naming_layer_and_fix(tmp_path):
    """`esegeta check` reports the refusals before anything runs; the run refuses the same entries."""
    from pathlib import Path

    import numpy as np

    from esegeta.run.check import check
    from esegeta.run.runner import Pipeline

    z = zoo("vit")
    (tmp_path / "zoo_factory.py").write_text(FACTORY.format(tests=str(Path(__file__).parent), name="vit"))
    np.save(tmp_path / "x.npy", z.x[0].numpy())
    methods = [{"id": "captum.IntegratedGradients", "params": {"n_steps": 8}},
               {"id": "captum.LayerGradCam", "layer": z.layer},
               {"id": "captum.LRP"},
               {"id": "gradcam.GradCAM", "layer": z.layer, "label": "vit", "params": {"reshape_transform": "vit"}},
               {"id": "zennit.EpsilonPlus"},
               {"id": "captum.DeepLift"}]
    cfg = {"model": {"factory": str(tmp_path / "zoo_factory.py") + ":build"},
           "inputs": {"paths": [str(tmp_path / "x.npy")], "spatial_dims": 2, "channel_axis": "first"},
           "target": 0, "output": {"dir": str(tmp_path / "out"), "formats": ["npy"]}, "methods": methods}
    report = check(cfg, base_dir=tmp_path)
    verdicts = [m.ok for m in report.methods]
    # LRP and zennit's composites run through attention on its substitutes (esegeta.attribution.rules)
    assert verdicts == [True, True, True, True, True, True]
    assert not any("MultiheadAttention" in n for m in report.methods for n in m.notes)
    Pipeline(cfg, base_dir=tmp_path).validate()
    result = Pipeline(cfg, base_dir=tmp_path).run()
    assert [r["status"] for r in result.runs] == ["ok"] * 6
    assert result.runs[1]["shape"] == [1, 4, 4]  # the token layer explained on its 4x4 grid
    # the manifest names the rules LRP ran with: the substitutes, and γ (0: the ε rule on dense layers)
    assert result.runs[2]["conservation"]["rules"]["gamma"] == 0.0
    assert "AttnLRP" in result.runs[2]["conservation"]["rules"]["substitutes"]
    # summation to delta holds through attention and LayerNorm on their substitutes: no warning
    assert not any("summation to delta" in w for r in result.runs for w in r["warnings"])


def test_check_notes_where_an_axiom_holds_only_approximately():
    deeplift = registry.get("captum.DeepLift")
    # InstanceNorm is exact on its substitute (esegeta.attribution.rules); LocalResponseNorm has none
    assert architectures.axiom_notes(deeplift, zoo("unet2d").model) == []
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.LocalResponseNorm(2))
    notes = architectures.axiom_notes(deeplift, model)
    assert notes and "LocalResponseNorm" in notes[0] and "summation to delta" in notes[0]
    assert architectures.axiom_notes(deeplift, zoo("resnet18").model) == []
    assert architectures.axiom_notes(registry.get("captum.Saliency"), zoo("unet2d").model) == []


def test_dynunet_in_train_mode_is_explained_in_eval_mode_and_left_training():
    z = zoo("dynunet")
    z.model.train()
    try:
        before = snapshot(z.model)
        attr = esegeta.explain(z.model, z.x, "captum.DeepLift", target=0, wrapper=z.wrapper)
        assert torch.isfinite(attr).all() and attr.shape == z.x.shape
        assert_unchanged(z.model, before)
        assert z.model.training
    finally:
        z.model.eval()
