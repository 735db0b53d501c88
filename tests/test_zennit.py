"""Zennit adapter: equal to direct zennit calls and to Captum where the methods coincide,
rule maps and their config errors, canonizers undone, the per-layer relevance trace.

Conformance (every zennit method on digits, retina2d and tissue3d) runs in test_conformance.py.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import esegeta
from esegeta.spec import registry
from esegeta.attribution import wrappers
from esegeta.errors import ConfigError
from esegeta.attribution.explainer import run
from esegeta.attribution.prepare import prepared
from esegeta.spec.request import from_arguments

from conftest import SAMPLES, assert_unchanged, hook_count, snapshot

if registry.get("zennit.EpsilonPlus").unavailable_reason():
    pytest.skip("zennit is not installed", allow_module_level=True)

EPS = {"rule": "epsilon", "epsilon": 1e-9}
#: Captum's LRP rules, as a zennit rule map: ε = 1e-9 on every layer with weights or pooling, ReLU passes.
CAPTUM_LIKE = {"Convolution": EPS, "Linear": EPS, "BatchNorm": EPS, "AvgPool": EPS, "MaxPool": EPS, "Flatten": EPS,
               "ReLU": "pass"}


def _zennit():
    from esegeta.adapters.zennit import _zennit

    return _zennit()


def _direct(case, composite=None, attributor="Gradient", seed=None, **kwargs):
    """The attribution zennit computes when called directly on esegeta's prepared copy."""
    zennit = _zennit()
    model = prepared(case.model, case.x)
    forward = model if case.wrapper is None else wrappers.build(model, case.x, case.wrapper)
    with torch.no_grad():
        width = forward(case.x).shape[1]
    one_hot = torch.eye(width)[[case.target]]
    cls = getattr(zennit.attribution, attributor)
    # a wrapper's masked sum is a linear layer: esegeta gives it zennit's own ε rule under an LRP
    # composite (esegeta.adapters.zennit._wrapper_head_rule), so the direct call does too
    lrp = composite is not None and type(composite).__name__ not in ("GuidedBackprop", "DeconvNet", "BetaSmooth")
    heads = [m for m in forward.modules() if isinstance(m, wrappers.MaskSum)] if lrp else []
    handles = [zennit.rules.Epsilon(epsilon=1e-6).register(m) for m in heads]
    try:
        with cls(forward, composite=composite, attr_output=seed or one_hot, **kwargs) as attribute:
            _, attribution = attribute(case.x)
    finally:
        for handle in handles:
            handle.remove()
    return attribution


def _explain(case, method, **params):
    return esegeta.explain(case.model, case.x, method, target=case.target, wrapper=case.wrapper, **params)


@pytest.mark.parametrize("name", ["digits", "retina"])
def test_epsilon_plus_equals_direct_zennit(name, request):
    case = request.getfixturevalue(name)
    zennit = _zennit()
    composite = zennit.composites.EpsilonPlus(canonizers=[zennit.canonizers.SequentialMergeBatchNorm()])
    expected = _direct(case, composite)
    assert torch.equal(_explain(case, "zennit.EpsilonPlus"), expected)
    # params pass through under zennit's names
    composite = zennit.composites.EpsilonPlus(epsilon=0.5, canonizers=[])
    assert torch.equal(_explain(case, "zennit.EpsilonPlus", epsilon=0.5, canonizers=[]), _direct(case, composite))


def test_epsilon_gamma_box_defaults_to_the_input_range(retina):
    zennit = _zennit()
    x = retina.x
    composite = zennit.composites.EpsilonGammaBox(low=x.min(), high=x.max(), gamma=0.5,
                                                  canonizers=[zennit.canonizers.SequentialMergeBatchNorm()])
    expected = _direct(retina, composite)
    assert torch.allclose(_explain(retina, "zennit.EpsilonGammaBox", gamma=0.5), expected, rtol=1e-5, atol=1e-7)
    per_channel = _explain(retina, "zennit.EpsilonGammaBox", low=[0, 0, 0], high=[1, 1, 1])
    composite = zennit.composites.EpsilonGammaBox(low=0.0, high=1.0,
                                                  canonizers=[zennit.canonizers.SequentialMergeBatchNorm()])
    assert torch.allclose(per_channel, _direct(retina, composite), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["digits", "retina"])
@pytest.mark.parametrize("zennit_id,captum_id,params", [
    ("zennit.Gradient", "captum.Saliency", {"abs": False}),
    ("zennit.GuidedBackprop", "captum.GuidedBackprop", {}),
    ("zennit.DeconvNet", "captum.Deconvolution", {}),
])
def test_modified_gradients_equal_captum(name, zennit_id, captum_id, params, request):
    case = request.getfixturevalue(name)
    ours = _explain(case, zennit_id)
    assert torch.equal(ours, _explain(case, captum_id, **params))
    assert ours.abs().sum() > 0


def test_lrp_epsilon_equals_captum_lrp_without_branches(digits):
    """On a network without branching tensors zennit's ε-LRP (seeded with 1) times the score is Captum's LRP."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
        model[1].bias.normal_()
        target = int(model(digits.x).argmax())
        score = model(digits.x)[0, target]
    ours = esegeta.explain(model, digits.x, "zennit.LayerMapComposite", target, layer_map=CAPTUM_LIKE, canonizers=[])
    theirs = esegeta.explain(model, digits.x, "captum.LRP", target)
    assert torch.allclose(ours * score, theirs, rtol=1e-5, atol=1e-8)


def test_lrp_epsilon_correlates_with_captum_lrp_on_digits(digits, retina):
    """On the sample ResNet and U-Net they differ where a layer's input also feeds a residual addition or a
    torch.cat: Captum multiplies the relevance arriving that way by the input again, zennit does not."""
    corr = {}
    for case in (digits, retina):
        ours = _explain(case, "zennit.LayerMapComposite", layer_map=CAPTUM_LIKE, canonizers=[])
        theirs = _explain(case, "captum.LRP")
        corr[case.name] = float(torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1])
    print(f"Pearson r, zennit all-epsilon LayerMapComposite vs captum.LRP: {corr}")
    assert corr["digits"] > 0.6 and corr["retina2d"] > 0.9


def test_layer_map_rules_and_groups(digits):
    zennit = _zennit()
    rules = zennit.rules
    layer_map = {"Linear": {"rule": "gamma", "gamma": 0.5}, "Convolution": "alpha1beta0", "Activation": "pass",
                 "types.Linear": "epsilon"}
    composite = zennit.composites.LayerMapComposite(
        layer_map=[(nn.Linear, rules.Gamma(gamma=0.5)), (zennit.types.Convolution, rules.AlphaBeta(alpha=1, beta=0)),
                   (zennit.types.Activation, rules.Pass()), (zennit.types.Linear, rules.Epsilon())],
        canonizers=[zennit.canonizers.SequentialMergeBatchNorm()])
    assert torch.equal(_explain(digits, "zennit.LayerMapComposite", layer_map=layer_map), _direct(digits, composite))
    first = {"Convolution": {"rule": "zbox", "low": 0.0, "high": 1.0}}
    composite = zennit.composites.SpecialFirstLayerMapComposite(
        layer_map=[(zennit.types.Convolution, rules.ZPlus()), (nn.Linear, rules.Epsilon()),
                   (zennit.types.Activation, rules.Pass())],
        first_map=[(zennit.types.Convolution, rules.ZBox(low=0.0, high=1.0))], canonizers=[])
    ours = _explain(digits, "zennit.SpecialFirstLayerMapComposite", first_map=first, canonizers=[],
                    layer_map={"Convolution": "zplus", "Linear": "epsilon", "Activation": "pass"})
    assert torch.equal(ours, _direct(digits, composite))


def test_name_map_rules_by_layer_name(digits, retina):
    zennit = _zennit()
    rules = zennit.rules
    name_map = {"stem.0": {"rule": "zbox", "low": 0.0, "high": 1.0}, "layer1.relu": "pass", "layer2.relu[1]": "pass",
                "fc": "epsilon"}
    composite = zennit.composites.NameLayerMapComposite(
        name_map=[(("model.stem.0",), rules.ZBox(low=0.0, high=1.0)),
                  (("model.layer1.relu.sites.0", "model.layer1.relu.sites.1"), rules.Pass()),
                  (("model.layer2.relu.sites.1",), rules.Pass()), (("model.fc",), rules.Epsilon())],
        layer_map=[(zennit.types.Convolution, rules.ZPlus())], canonizers=[])
    ours = _explain(digits, "zennit.NameLayerMapComposite", name_map=name_map, layer_map={"Convolution": "zplus"},
                    canonizers=[])
    assert torch.equal(ours, _direct(digits, composite))
    # with a wrapper the model sits deeper in call.forward: names are still the user's
    composite = zennit.composites.NameLayerMapComposite(
        name_map=[(("model.model.enc1.0",), rules.Flat())], layer_map=[(zennit.types.Convolution, rules.Epsilon())],
        canonizers=[])
    ours = _explain(retina, "zennit.NameLayerMapComposite", name_map={"enc1.0": "flat"},
                    layer_map={"Convolution": "epsilon"}, canonizers=[])
    assert torch.equal(ours, _direct(retina, composite))
    with pytest.raises(ConfigError) as err:
        _explain(digits, "zennit.NameLayerMapComposite", name_map={"stemm.0": "flat"})
    assert err.value.path == "params.name_map.stemm.0" and "did you mean stem.0?" in err.value.message


@pytest.mark.parametrize("params,path,message", [
    ({"layer_map": {"Conv2d": "epsilo"}}, "params.layer_map.Conv2d", "did you mean epsilon?"),
    ({"layer_map": {"Conv2D": "epsilon"}}, "params.layer_map.Conv2D", "did you mean Conv2d?"),
    ({"layer_map": {"Linear": {"rule": "gamma", "gama": 0.25}}}, "params.layer_map.Linear.gama", "did you mean gamma?"),
    ({"layer_map": {"Linear": {"rule": "gamma", "gamma": "big"}}}, "params.layer_map.Linear.gamma", "a number"),
    ({"layer_map": {"ReLU": {"gamma": 0.25}}}, "params.layer_map.ReLU", '{"rule": "gamma"'),
    ({"layer_map": ["Conv2d", "epsilon"]}, "params.layer_map", "maps layer types to rules"),
    ({"layer_map": {"Linear": {"rule": "alphabeta", "alpha": 3}}}, "params.layer_map.Linear", "alpha - beta = 1"),
    ({"layer_map": {"ReLU": {"rule": "pass", "epsilon": 0.1}}}, "params.layer_map.ReLU.epsilon", "it takes none"),
    ({"layer_map": {"Linear": "pass"}, "canonizers": ["SequentialMergeBatchnorm"]}, "params.canonizers[0]",
     "did you mean SequentialMergeBatchNorm?"),
])
def test_rule_map_errors_name_the_fix(params, path, message):
    with pytest.raises(ConfigError) as err:
        esegeta.explain(nn.Linear(4, 2), torch.zeros(1, 1, 4), "zennit.LayerMapComposite", 0, **params)
    assert err.value.path == f"explain.{path}"
    assert message in err.value.message


@pytest.mark.parametrize("method,params,path,message", [
    ("zennit.SmoothGrad", {"composite": "EpsilonPlsu"}, "params.composite", "did you mean EpsilonPlus?"),
    ("zennit.Gradient", {"composite": {"name": "EpsilonPlus", "epsilom": 1}}, "params.composite.epsilom",
     "did you mean epsilon?"),
    ("zennit.Gradient", {"composite": {"name": "LayerMapComposite"}}, "params.composite", "needs layer_map"),
    ("zennit.SmoothGrad", {"trace": True}, "params.trace", "unknown parameter"),
    ("zennit.Occlusion", {"window": 0}, "params.window", "positive integer"),
    ("zennit.SmoothGrad", {"n_iter": 2.5}, "params.n_iter", "positive integer"),
    ("zennit.IntegratedGradients", {"baseline_fn": "zero"}, "params.baseline_fn", "unknown baseline"),
    ("zennit.EpsilonGammaBox", {"low": "min"}, "params.low", "one per input channel"),
    ("zennit.EpsilonPlus", {"trace": "yes"}, "params.trace", "true or false"),
    ("zennit.LayerMapComposite", {}, "params", "needs params.layer_map"),
])
def test_bad_params_are_config_errors(digits, method, params, path, message):
    with pytest.raises(ConfigError) as err:
        esegeta.explain(digits.model, digits.x, method, 3, **params)
    assert err.value.path == f"explain.{path}"
    assert message in err.value.message


def test_attributor_with_a_named_composite(digits, retina):
    for case in (digits, retina):
        assert torch.equal(_explain(case, "zennit.Gradient", composite="EpsilonPlus"), _explain(case, "zennit.EpsilonPlus"))
    zennit = _zennit()
    composite = zennit.composites.EpsilonAlpha2Beta1(epsilon=0.1, canonizers=[])
    torch.manual_seed(0)
    expected = _direct(digits, composite, "SmoothGrad", n_iter=3, noise_level=0.2)
    torch.manual_seed(0)
    ours = _explain(digits, "zennit.SmoothGrad", n_iter=3, noise_level=0.2,
                    composite={"name": "EpsilonAlpha2Beta1", "epsilon": 0.1, "canonizers": []})
    assert torch.equal(ours, expected)


def test_batch_with_predicted_targets(digits):
    """A batch is one upstream call; each input is seeded with its own predicted class."""
    other = torch.from_numpy(np.load(SAMPLES / "data" / "digits" / "digit_9_label7.npy")).float()[None]
    x = torch.cat([digits.x, other])
    with torch.no_grad():
        predicted = digits.model(x).argmax(1)
    batch = esegeta.explain(digits.model, x, "zennit.EpsilonPlus", "predicted")
    assert predicted.tolist() == [3, 7]
    for n in range(2):
        alone = esegeta.explain(digits.model, x[n:n + 1], "zennit.EpsilonPlus", int(predicted[n]))
        assert torch.allclose(batch[n:n + 1], alone, rtol=1e-5, atol=1e-7)


def test_smoothgrad_of_one_iteration_is_the_gradient(retina):
    assert torch.equal(_explain(retina, "zennit.SmoothGrad", n_iter=1), _explain(retina, "zennit.Gradient"))


def test_integrated_gradients_completeness(digits):
    attr = _explain(digits, "zennit.IntegratedGradients", n_iter=256)  # zennit sums the gradients at k/n, k = 1..n
    with torch.no_grad():
        scores = digits.model(digits.x)[0, 3] - digits.model(torch.zeros_like(digits.x))[0, 3]
    assert float(attr.sum()) == pytest.approx(float(scores), rel=0.02)  # right Riemann sum: 1.0% off at 256
    zennit = _zennit()
    expected = _direct(digits, None, "IntegratedGradients", n_iter=16, baseline_fn=lambda x: torch.full_like(x, 0.5))
    assert torch.equal(_explain(digits, "zennit.IntegratedGradients", n_iter=16, baseline_fn=0.5), expected)
    assert zennit is not None


def test_occlusion_scores_the_target(digits):
    """Zennit's Occlusion sums attr_output(output): the adapter makes that the target score, so one window
    covering the whole input gives the score everywhere, and a window keeps only its own pixels."""
    with torch.no_grad():
        score = digits.model(digits.x)[0, 3]
    whole = _explain(digits, "zennit.Occlusion", window=8, stride=8)
    assert torch.allclose(whole, score.expand_as(whole))
    quarters = _explain(digits, "zennit.Occlusion", window=[4, 4], stride=[4, 4])
    x = digits.x.clone()
    x[..., 4:, :] = 0
    x[..., :, 4:] = 0
    with torch.no_grad():
        top_left = digits.model(x)[0, 3]
    assert torch.allclose(quarters[..., :4, :4], top_left.expand(1, 1, 4, 4))


def _trace(case, method="zennit.EpsilonPlus", **params):
    request = from_arguments(method, target=case.target, wrapper=case.wrapper, params={"trace": True, **params})
    outcome = run(request, prepared(case.model, case.x), case.x)
    return outcome.result, outcome.extras["trace"]


def test_trace_records_every_layer(digits, tissue):
    result, trace = _trace(digits)
    assert list(trace)[:4] == ["stem.0", "stem.1", "relu", "layer1.conv1"]
    assert {"layer1.relu[0]", "layer1.relu[1]", "layer2.downsample.0", "fc"} <= set(trace)
    assert torch.equal(trace["stem.0"], result)  # the input feeds the first layer only
    # ε-rule at the last layer: its input relevance is the target logit without its bias, over the logit
    with torch.no_grad():
        logit = digits.model(digits.x)[0, 3]
        expected = float((logit - digits.model.fc.bias[3]) / logit)
    assert float(trace["fc"].sum()) == pytest.approx(expected, rel=1e-4)
    assert trace["fc"].shape == (1, 32) and trace["layer2.conv2"].shape == (1, 32, 4, 4)
    result, trace = _trace(tissue)
    assert trace["enc1.0"].shape == tissue.x.shape and trace["head"].shape == (1, 8, 20, 24, 16)
    assert torch.equal(trace["enc1.0"], result)
    plain, trace = _trace(digits, "zennit.Gradient")
    assert torch.equal(trace["stem.0"], plain)
    assert hook_count(prepared(digits.model, digits.x)) == 0


def test_trace_of_a_wrapped_batch_has_every_input(retina):
    """A wrapped batch explained one input per call keeps each input's trace (it kept the first's only:
    the second input's slice was empty)."""
    x = torch.cat([retina.x, retina.x.flip(-1)])
    request = from_arguments("zennit.EpsilonPlus", target=retina.target, wrapper=retina.wrapper, params={"trace": True})
    outcome = run(request, prepared(retina.model, x), x)
    trace = outcome.extras["trace"]
    assert trace["enc1.0"].shape[0] == 2 and torch.equal(trace["enc1.0"], outcome.result)
    for i in range(2):
        alone, alone_trace = _trace(replace(retina, x=x[i:i + 1]))
        assert torch.allclose(trace["enc2.3"][i:i + 1], alone_trace["enc2.3"], rtol=1e-5, atol=1e-7)


def test_trace_is_saved_as_npz(tmp_path):
    config = {
        "model": {"factory": str(SAMPLES / "models.py") + ":DigitResNet",
                  "weights": str(SAMPLES / "checkpoints" / "digit_resnet.pt")},
        "inputs": {"paths": [str(SAMPLES / "data" / "digits" / "digit_30_label3.npy")], "spatial_dims": 2},
        "target": 3,
        "output": {"dir": str(tmp_path), "formats": ["npy"]},
        "methods": [{"id": "zennit.EpsilonPlusFlat", "params": {"trace": True}}],
    }
    result = esegeta.Pipeline(config).run()
    runs = result.manifest["runs"] if hasattr(result, "manifest") else None
    files = sorted(tmp_path.rglob("*.trace.npz"))
    assert len(files) == 1, (runs, sorted(p.name for p in tmp_path.rglob("*")))
    with np.load(files[0]) as trace:
        assert "stem.0" in trace.files and "fc" in trace.files
        assert trace["stem.0"].shape == (1, 8, 8) and np.abs(trace["stem.0"]).sum() > 0
        relevance = np.load(next(tmp_path.rglob("zennit.EpsilonPlusFlat.npy")))
        np.testing.assert_array_equal(trace["stem.0"], relevance)


def test_canonizers_are_undone_exactly(digits, tissue):
    for case in (digits, tissue):
        before = snapshot(case.model)
        copy = prepared(case.model, case.x)
        state = {k: v.clone() for k, v in copy.state_dict().items()}
        params = {n: p for n, p in copy.named_parameters()}
        merged = _explain(case, "zennit.EpsilonPlus")
        assert not torch.equal(merged, _explain(case, "zennit.EpsilonPlus", canonizers=[]))  # folding BN mattered
        assert prepared(case.model, case.x) is copy
        after = copy.state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
        assert {n: p for n, p in copy.named_parameters()} == params  # the same Parameter objects, no bias added
        assert hook_count(copy) == 0
        assert_unchanged(case.model, before)


def test_prepared_copy_restored_when_a_canonizer_fails(digits):
    """BatchNorm without affine parameters makes zennit's merge fail after it merged the first block:
    the adapter puts the merged weights back."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4, affine=False), nn.Flatten(), nn.Linear(64, 10)).eval()
    copy = prepared(model, digits.x)
    state = {k: v.clone() for k, v in copy.state_dict().items()}
    with pytest.raises(AttributeError):  # zennit reads the BatchNorm's weight, which is None
        esegeta.explain(model, digits.x, "zennit.EpsilonPlus", 3, canonizers=["SequentialMergeBatchNorm"])
    # the default folds along the graph, and only BatchNorms with parameters: it runs
    assert esegeta.explain(model, digits.x, "zennit.EpsilonPlus", 3).abs().sum() > 0
    after = copy.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert copy.model[0].bias is None and hook_count(copy) == 0
    assert esegeta.explain(model, digits.x, "zennit.EpsilonPlus", 3, canonizers=[]).abs().sum() > 0


def test_inputs_are_left_alone(retina):
    x = retina.x.clone()
    esegeta.explain(retina.model, x, "zennit.EpsilonGammaBox", target=1, wrapper=retina.wrapper, trace=True)
    assert not x.requires_grad and x.grad is None and torch.equal(x, retina.x)


def test_composites_are_read_from_upstreams_registry():
    """The composites esegeta registers are those zennit registers (read from its source without
    importing it), plus the three rule-map composites; BetaSmooth came with that, unlisted here."""
    from esegeta.adapters.zennit import MAP_COMPOSITES, upstream_composites

    zennit = _zennit()
    assert set(upstream_composites()) == {cls.__name__ for cls in zennit.composites.COMPOSITES.values()}
    ids = {i.removeprefix("zennit.") for i in registry.all_methods() if i.startswith("zennit.")}
    assert set(upstream_composites()) | set(MAP_COMPOSITES) <= ids and "BetaSmooth" in ids


def test_beta_smooth_equals_direct_zennit(digits):
    zennit = _zennit()
    ours = esegeta.explain(digits.model, digits.x, "zennit.BetaSmooth", 3, beta_smooth=5.0)
    net = prepared(digits.model, digits.x)
    composite = zennit.composites.BetaSmooth(beta_smooth=5.0)
    with zennit.attribution.Gradient(net, composite=composite) as attributor:
        _, direct = attributor(digits.x, torch.eye(10)[[3]])
    assert torch.allclose(ours, direct, atol=1e-6)


def test_rules_groups_and_canonizers_are_read_from_upstream():
    """Every rule class of zennit.rules is a JSON rule name (lower-cased), every type group of
    zennit.types a layer type, every argument-free canonizer a canonizer name: a new upstream
    one needs no edit here; esegeta's aliases stay."""
    import inspect

    from esegeta.adapters.zennit import RULE_ALIASES, canonizers, groups, rules

    zennit = _zennit()
    upstream_rules = {n for n, c in vars(zennit.rules).items()
                      if inspect.isclass(c) and issubclass(c, zennit.core.Hook) and c.__module__ == "zennit.rules"}
    assert {n.lower() for n in upstream_rules} | set(RULE_ALIASES) == set(rules())
    assert {"Epsilon", "Gamma", "AlphaBeta", "ZBox", "ZPlus", "Flat", "WSquare", "Pass", "Norm"} <= upstream_rules
    assert {"Convolution", "Linear", "BatchNorm", "AvgPool", "Activation", "Sum"} <= set(groups())
    assert {"SequentialMergeBatchNorm", "VGGCanonizer", "ResNetCanonizer"} <= set(canonizers())
    assert "Canonizer" not in canonizers() and "MergeBatchNorm" not in canonizers()  # bases, no apply of their own
    assert "NamedMergeBatchNorm" not in canonizers()  # needs a name map: not expressible as a name alone
