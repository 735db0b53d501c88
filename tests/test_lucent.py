"""lucent.render_vis on the real sample models: objectives, equality with lucent called
directly, deep dream from the input, config errors, hooks and the user's model untouched."""
from __future__ import annotations

import inspect

import json

import numpy as np
import pytest
import torch

import esegeta
from esegeta.attribution import wrappers
from esegeta.compat import import_torchvision
from esegeta.errors import ConfigError
from esegeta.attribution.explainer import run
from esegeta.attribution.prepare import prepared
from esegeta.spec.request import from_arguments
from esegeta.run.runner import Pipeline

from conftest import ROOT, assert_unchanged, hook_count, snapshot

pytest.importorskip("lucent")
import_torchvision()
from lucent.optvis import objectives, param, render  # noqa: E402

METHOD = "lucent.render_vis"
OBJECTIVES = [{"objective": "channel", "n_channel": 1}, {"objective": "neuron", "n_channel": 1, "x": 1, "y": 0},
              {"objective": "deepdream"}, {"objective": "class"}]


def _explain(case, seed=0, **params):
    torch.manual_seed(seed)
    np.random.seed(seed)
    params.setdefault("thresholds", [8])
    return esegeta.explain(case.model, case.x, METHOD, case.target, wrapper=case.wrapper, layer=case.layer, **params)


def _close_hooks(model):
    for module in model.modules():
        for fn in list(module._forward_hooks.values()):
            if isinstance(getattr(fn, "__self__", None), render.ModuleHook):
                fn.__self__.close()


def _direct(model, objective, param_f, x, seed=0, **kwargs):
    """lucent's render_vis called directly (hooks closed afterwards), last image as (B, C, H, W)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    try:
        images = render.render_vis(model, objective, param_f=param_f, preprocess=False, progress=False,
                                   show_image=False, fixed_image_size=tuple(x.shape[2:]), **kwargs)
    finally:
        _close_hooks(model)
    return torch.from_numpy(images[-1]).permute(0, 3, 1, 2)


@pytest.mark.parametrize("params", OBJECTIVES, ids=lambda p: p["objective"])
@pytest.mark.parametrize("name", ["digits", "retina"])
def test_each_objective(request, name, params):
    case = request.getfixturevalue(name)
    before = snapshot(case.model)
    image = _explain(case, **params)
    assert image.dtype == torch.float32
    assert image.shape == case.x.shape  # default size and channels: the input's
    assert 0 <= image.min() and image.max() <= 1  # lucent's sigmoid-parameterised image
    assert image.std() > 0
    assert_unchanged(case.model, before)
    net = prepared(case.model, case.x)
    assert hook_count(net) == 0
    assert all(p.requires_grad for p in net.parameters())


def test_objectives_differ(digits):
    images = [_explain(digits, **p) for p in OBJECTIVES]
    for i in range(len(images)):
        for j in range(i):
            assert not torch.allclose(images[i], images[j]), (OBJECTIVES[i], OBJECTIVES[j])


def test_channel_equals_lucent_directly(digits):
    image = _explain(digits, objective="channel", n_channel=1)
    net = prepared(digits.model, digits.x)
    direct = _direct(net, objectives.channel("model_layer2", 1), lambda: param.image(8, 8, batch=1, channels=1),
                     digits.x, thresholds=(8,))
    assert torch.equal(image, direct)


def test_objectives_are_read_from_lucent():
    """Every layer objective lucent ships is an esegeta objective, with its own argument names;
    esegeta adds only deepdream and class."""
    from esegeta.adapters.lucent import OWN_OBJECTIVES
    from esegeta.adapters.lucent import objectives as ours

    upstream = {n for n, f in vars(objectives).items() if callable(getattr(f, "__wrapped__", None))
                and next(iter(inspect.signature(f.__wrapped__).parameters), None) == "layer"}
    assert {"channel", "neuron", "direction", "alignment", "diversity"} <= upstream
    assert set(ours()) == upstream | set(OWN_OBJECTIVES)
    assert ours()["direction"].needs == {"direction"} and ours()["neuron"].takes == {"n_channel", "x", "y"}


def test_direction_equals_lucent_directly(digits):
    direction = [((7 * i) % 5 - 2) / 2 for i in range(_channels(digits))]  # one number per channel of layer2
    image = _explain(digits, objective="direction", direction=direction)
    net = prepared(digits.model, digits.x)
    direct = _direct(net, objectives.direction("model_layer2", torch.tensor(direction)),
                     lambda: param.image(8, 8, batch=1, channels=1), digits.x, thresholds=(8,))
    assert torch.equal(image, direct)
    with pytest.raises(ConfigError, match="params.direction: direction needs one number per channel"):
        _explain(digits, objective="direction", direction=[1.0])


def _channels(case) -> int:
    seen = []
    handle = case.model.get_submodule(case.layer).register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    with torch.no_grad():
        case.model(case.x)
    handle.remove()
    return seen[0]


def test_class_with_wrapper_equals_lucent_directly(retina):
    image = _explain(retina, objective="class", param_f={"fft": False}, thresholds=[4])
    wrapped = wrappers.build(prepared(retina.model, retina.x), retina.x, retina.wrapper)
    # On the wrapped model the scores are the output of its 'score' module.
    direct = _direct(wrapped, objectives.channel("score", 1), lambda: param.image(48, 48, batch=1, fft=False),
                     retina.x, thresholds=(4,))
    assert torch.equal(image, direct)


@pytest.mark.parametrize("name", ["digits", "retina"])
def test_class_objective_raises_the_target_score(request, name):
    """Without lucent's transforms (made for 224-pixel images: pad 12, jitter 8) the model
    sees the optimised image itself: its target score (wrapped, for retina) must rise."""
    case = request.getfixturevalue(name)
    net = prepared(case.model, case.x)
    scores = wrappers.build(net, case.x, case.wrapper) if case.wrapper else net
    extras = {}
    torch.manual_seed(0)
    np.random.seed(0)
    outcome = run(from_arguments(METHOD, target=case.target, wrapper=case.wrapper, layer=case.layer,
                                 params={"objective": "class", "thresholds": [1, 32], "transforms": []}), net, case.x)
    image, extras = outcome.result, outcome.extras
    with torch.no_grad():
        first, last = scores(extras["thresholds"]["step_1"])[0], scores(image)[0]
    assert last[case.target] > first[case.target] + 0.5 * first[case.target].abs() + 1.0
    if case.wrapper is None:  # a wrapper's columns sum over regions of different sizes
        assert last.argmax() == case.target


def test_class_equals_channel_of_the_logits(digits):
    """On a classifier the class objective is lucent's channel objective on the last layer."""
    by_class = _explain(digits, objective="class")
    torch.manual_seed(0)
    np.random.seed(0)
    by_channel = esegeta.explain(digits.model, digits.x, METHOD, 3, layer="fc", objective="channel", n_channel=3,
                                 thresholds=[8])
    assert torch.equal(by_class, by_channel)


def test_deepdream_starts_at_the_input(digits):
    one_step = _explain(digits, objective="deepdream", param_f="input", thresholds=[1])
    change = (one_step - digits.x).abs()
    # One Adam step (lucent's lr 0.05) moves each pixel by at most lr.
    assert change.max() <= 0.05 + 1e-6 and change.max() > 0.01
    longer = _explain(digits, objective="deepdream", param_f="input", thresholds=[16])
    assert (longer - digits.x).abs().max() > change.max()


def test_deepdream_from_input_equals_direct(retina):
    image = _explain(retina, objective="deepdream", param_f="input", thresholds=[3])
    net = prepared(retina.model, retina.x)
    start = retina.x.clone().requires_grad_(True)

    def deepdream(hook):
        return -(hook("model_enc2") ** 2).mean()

    direct = _direct(net, deepdream, lambda: ([start], lambda: start), retina.x, thresholds=(3,))
    assert torch.equal(image, direct)


def test_batch_of_inputs_gives_one_image_each(digits):
    x = torch.cat([digits.x, digits.x.flip(-1)])
    torch.manual_seed(0)
    image = esegeta.explain(digits.model, x, METHOD, "predicted", layer="layer2", objective="class", thresholds=[4])
    assert image.shape == x.shape


def test_size_and_optimizer_and_transforms(digits):
    image = _explain(digits, objective="channel", n_channel=0, param_f={"w": 12, "h": 10},
                     optimizer={"name": "SGD", "lr": 0.5}, transforms=[{"pad": {"w": 2}}, {"jitter": {"d": 2}}])
    assert image.shape == (1, 1, 10, 12)


def test_lucent_sizes(digits):
    """param_f's h defaults to its w, as in lucent; fixed_image_size null is lucent's own
    behaviour (small images are upsampled to 224 for the model: a layer 8x8 → 112x112)."""
    assert _explain(digits, objective="channel", n_channel=0, param_f={"w": 12}).shape == (1, 1, 12, 12)
    image = _explain(digits, objective="neuron", n_channel=0, x=100, y=100, fixed_image_size=None, thresholds=[2])
    assert image.shape == digits.x.shape
    with pytest.raises(ConfigError, match="beyond"):
        _explain(digits, objective="neuron", n_channel=0, x=100, y=100)


@pytest.mark.parametrize("params,path", [
    ({"objective": "chanel", "n_channel": 0}, "params.objective"),
    ({"objective": "channel", "n_chanel": 0}, "params.n_chanel"),
    ({"objective": "channel"}, "params.n_channel"),
    ({"objective": "deepdream", "n_channel": 0}, "params.n_channel"),
    ({"objective": "channel", "n_channel": 999}, "params.n_channel"),
    ({"objective": "neuron", "n_channel": 0, "x": 99}, "params.x"),
    ({"objective": "channel", "n_channel": 0, "param_f": {"ff": True}}, "params.param_f.ff"),
    ({"objective": "channel", "n_channel": 0, "param_f": {"decorrelate": True}}, "params.param_f.decorrelate"),
    ({"objective": "channel", "n_channel": 0, "param_f": {"channels": 3}}, "params.param_f.channels"),
    ({"objective": "channel", "n_channel": 0, "thresholds": [0]}, "params.thresholds"),
    ({"objective": "channel", "n_channel": 0, "optimizer": {"name": "Adamm"}}, "params.optimizer.name"),
    ({"objective": "channel", "n_channel": 0, "optimizer": {"learning_rate": 1}}, "params.optimizer.learning_rate"),
    ({"objective": "channel", "n_channel": 0, "transforms": [{"jiter": {"d": 2}}]}, "params.transforms[0]"),
    ({"objective": "channel", "n_channel": 0, "show_image": True}, "params.show_image"),
    ({"n_channel": 0}, "params"),
])
def test_config_errors(digits, params, path):
    before = snapshot(digits.model)
    with pytest.raises(ConfigError) as err:
        esegeta.explain(digits.model, digits.x, METHOD, 3, layer="layer2", **params)
    assert err.value.path.endswith(path), err.value
    assert_unchanged(digits.model, before)
    assert hook_count(prepared(digits.model, digits.x)) == 0


def test_neuron_needs_a_spatial_layer(digits):
    with pytest.raises(ConfigError, match="needs a layer with a"):
        esegeta.explain(digits.model, digits.x, METHOD, 3, layer="fc", objective="neuron", n_channel=0)


def test_wrapped_class_keeps_the_input_size(retina):
    with pytest.raises(ConfigError, match="masks are frozen") as err:
        _explain(retina, objective="class", fixed_image_size=64)
    assert err.value.path == "params.fixed_image_size"


def test_layer_typo(digits):
    with pytest.raises(ConfigError, match="did you mean layer2"):
        esegeta.explain(digits.model, digits.x, METHOD, 3, layer="layer22", objective="channel", n_channel=0)


def test_hooks_closed_on_error(digits, monkeypatch):
    def fail(tensor):
        raise RuntimeError("boom")

    monkeypatch.setattr(render, "tensor_to_img_array", fail)
    before = snapshot(digits.model)
    with pytest.raises(RuntimeError, match="boom"):
        _explain(digits, objective="channel", n_channel=0)
    net = prepared(digits.model, digits.x)
    assert hook_count(net) == 0
    assert all(p.requires_grad for p in net.parameters())
    assert_unchanged(digits.model, before)


def test_pipeline_writes_the_image(tmp_path):
    config = {
        "model": {"factory": str(ROOT / "samples/models.py") + ":DigitResNet",
                  "weights": str(ROOT / "samples/checkpoints/digit_resnet.pt")},
        "inputs": {"paths": [str(ROOT / "samples/data/digits/digit_30_label3.npy")], "spatial_dims": 2},
        "target": 3,
        "output": {"dir": str(tmp_path), "formats": ["npy", "png"]},
        "methods": [{"id": "captum.Saliency"},
                    {"id": METHOD, "layer": "layer2", "label": "dream",
                     "params": {"objective": "class", "thresholds": [2, 4]}}],
    }
    result = Pipeline(config).run()
    assert result.exit_code == 0, result.runs
    run = next(r for r in result.runs if r["label"] == "dream")
    image = np.load(tmp_path / run["files"]["npy"])
    assert image.shape == (1, 8, 8) and image.dtype == np.float32
    assert (tmp_path / run["files"]["png"]).stat().st_size > 1000
    steps = np.load(tmp_path / run["files"]["thresholds"])
    assert list(steps) == ["step_2"] and steps["step_2"].shape == (1, 8, 8)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest.get("overview") == "overview.png" and (tmp_path / "overview.png").is_file()
