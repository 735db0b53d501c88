"""esegeta.attribution.guard.restored: every change to the prepared copy is undone, on exit and on error;
esegeta.hooks.removing: the hooks esegeta itself registers are removed, also on error.

One generic test over every hook dict torch keeps (module, tensor and global hooks), swapped
modules, parameter flags, gradients, replaced data and added attributes; one per library that
makes the real upstream call fail half-way (after it changed the copy) and checks the copy; and
the guard's cost on the digits ResNet, since it runs on every call.
"""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

import esegeta
from esegeta.spec import registry
from esegeta.algorithms import cam, patterns
from esegeta.attribution import architectures
from esegeta.attribution.guard import restored
from esegeta.attribution.prepare import _count_calls, prepared
from esegeta.hooks import removing

from conftest import hook_count

MODULE_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                     "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                     "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
                     "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _state(model: nn.Module) -> dict:
    """Everything the guard promises to restore, by identity or value."""
    modules = list(model.modules())
    return {
        "dicts": [{k: {kk: id(vv) for kk, vv in v.items()} if isinstance(v, dict) else id(v)
                   for k, v in vars(m).items()} for m in modules],
        "children": [(n, id(m)) for n, m in model.named_modules()],
        "tensors": [(n, t.data_ptr(), t.requires_grad, t.grad, dict(t._backward_hooks or {}),
                     dict(getattr(t, "_post_accumulate_grad_hooks", None) or {}))
                    for n, t in [*model.named_parameters(), *model.named_buffers()]],
        "globals": {k: dict(v) for k, v in vars(torch_module).items() if k.startswith("_global_") and isinstance(v, dict)},
    }


def _change_everything(model: nn.Sequential) -> None:
    conv, bn = model[0], model[1]
    noop = lambda *a, **k: None  # noqa: E731
    conv.register_forward_hook(noop)
    conv.register_forward_hook(noop, with_kwargs=True, always_call=True)
    conv.register_forward_pre_hook(noop, with_kwargs=True)
    conv.register_forward_pre_hook(noop, prepend=True)
    conv.register_full_backward_hook(noop)
    conv.register_full_backward_pre_hook(noop)
    conv.register_state_dict_pre_hook(noop)
    conv._register_state_dict_hook(noop)
    conv.register_load_state_dict_post_hook(noop)
    conv._register_load_state_dict_pre_hook(noop)
    torch.nn.modules.module.register_module_forward_hook(noop)
    torch.nn.modules.module.register_module_forward_pre_hook(noop)
    torch.nn.modules.module.register_module_full_backward_hook(noop)
    conv.weight.register_hook(lambda g: g)
    conv.weight.register_post_accumulate_grad_hook(noop)
    conv.weight.requires_grad_(False)
    conv.bias.grad = torch.ones_like(conv.bias)
    conv.weight.data = conv.weight.data * 2  # new storage, as canonizers do
    model[2] = nn.Identity()  # a swapped module
    bn.train()
    bn.x = torch.zeros(1)  # an attribute stored on a module (SHAP's DeepExplainer)
    conv.forward = lambda x: x  # an instance forward


class HalfWay(Exception):
    """The injected failure."""


def test_every_hook_dict_flag_and_swap_is_restored_on_error():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten()).eval()
    assert all(hasattr(model[0], name) for name in MODULE_HOOK_DICTS)
    before = _state(model)
    with pytest.raises(RuntimeError, match="half-way"):
        with restored(model):
            _change_everything(model)
            # every dict torch keeps on a module now holds something new
            assert all(getattr(model[0], name) for name in MODULE_HOOK_DICTS)
            raise RuntimeError("failed half-way")
    assert _state(model) == before
    assert model[1].training is False and not hasattr(model[1], "x") and "forward" not in vars(model[0])
    out = model(torch.randn(1, 1, 5, 5))
    assert out.shape == (1, 18)


def test_hooks_that_were_there_stay():
    model = nn.Sequential(nn.Linear(2, 2))
    handle = model[0].register_forward_hook(lambda *a: None)
    with restored(model):
        handle.remove()  # a library may remove what it found: the guard puts it back (the copy is unchanged)
    assert len(model[0]._forward_hooks) == 1


def test_a_hook_registered_inside_removing_is_removed_when_the_body_raises():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    seen = []
    with pytest.raises(ValueError, match="the body failed"):
        with removing(model[0].register_forward_hook(lambda m, i, o: seen.append(o))) as handles:
            handles.append(model[1].register_forward_pre_hook(lambda m, i: None))
            model(torch.ones(1, 2))
            assert hook_count(model) == 2
            raise ValueError("the body failed")
    assert len(seen) == 1 and hook_count(model) == 0


def test_removing_keeps_the_hooks_registered_before_one_that_fails():
    """``handles.extend(generator)``: a registration failing half-way leaves none of the earlier ones."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))

    def register(module):
        if module is model[2]:
            raise RuntimeError("this module takes no hooks")
        return module.register_forward_hook(lambda m, i, o: None)

    with pytest.raises(RuntimeError, match="takes no hooks"):
        with removing() as handles:
            handles.extend(register(m) for m in model)
    assert len(handles) == 2 and hook_count(model) == 0


class _Fails(nn.Module):
    def forward(self, x):
        raise RuntimeError("the model failed on its last layer")


@pytest.mark.parametrize("record", [
    lambda model, x: _count_calls(model, x),
    lambda model, x: architectures.products(model, x),
    lambda model, x: architectures.linear_norm_pairs(model, x),
    lambda model, x: registry.Call(model, model, x, None, model[0], {}).layer_output(),
    lambda model, x: cam._record(model, x, dict(model.named_children())),
    lambda model, x: patterns.kernels(model, x, "esegeta.PatternNet"),
], ids=["count_calls", "products", "linear_norm_pairs", "layer_output", "cam", "patterns"])
def test_esegeta_s_own_hooks_are_removed_when_the_forward_pass_fails(record):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), _Fails()).eval()
    with pytest.raises(RuntimeError, match="failed on its last layer"):
        record(model, torch.randn(1, 1, 5, 5))
    assert hook_count(model) == 0


@pytest.mark.parametrize("method_id, layer", [
    ("captum.LRP", None), ("gradcam.AblationCAM", "enc2"), ("torchray.linear_approx", "enc2"),
    ("zennit.EpsilonPlus", None), ("shap.DeepExplainer", None), ("lucent.render_vis", "enc2"),
    ("esegeta.PatternNet", None),
])
def test_each_library_failing_half_way_leaves_the_copy_as_it_was(retina, method_id, layer):
    """The model's last layer fails half-way through the forwards a successful call makes (the
    library has hooked, swapped and set flags by then): the copy is as before, with no hook left."""
    spec = registry.get(method_id)
    if spec.unavailable_reason():
        pytest.skip(spec.unavailable_reason())
    params = {k: (v(retina.x) if callable(v) else v) for k, v in spec.quick_params.items()}
    if method_id == "lucent.render_vis":
        params = {"objective": "deepdream", "thresholds": [3]}

    def explain():
        esegeta.explain(retina.model, retina.x, method_id, target=1, wrapper=retina.wrapper, layer=layer, **params)

    copy = prepared(retina.model, retina.x)
    last = [m for m in copy.modules() if not list(m.children())][-1]
    calls = [0, None]

    def count_or_fail(module, args, output):
        calls[0] += 1
        if calls[0] == calls[1]:
            raise HalfWay  # not a RuntimeError: Lucent swallows those from the model

    handle = last.register_forward_hook(count_or_fail)
    try:
        explain()  # fits or caches what it needs
        calls[0] = 0
        explain()
        assert calls[0] >= 2, f"{method_id}: the library never ran the model"
        calls[:] = [0, max(2, calls[0] - 1)]  # late: the library has made its changes by then
        before = _state(copy)
        with pytest.raises(HalfWay):
            explain()
        assert calls[0] == calls[1]
        after = _state(copy)
    finally:
        handle.remove()
    assert after == before
    assert hook_count(copy) == 0


def test_cost_on_the_digits_resnet(digits):
    """It runs on every call: well under a millisecond or two on the digits ResNet (38 tensors, 30 modules)."""
    copy = prepared(digits.model, digits.x)
    for _ in range(20):
        with restored(copy):
            pass
    n = 200
    start = time.perf_counter()
    for _ in range(n):
        with restored(copy):
            pass
    per_call_ms = (time.perf_counter() - start) / n * 1e3
    assert per_call_ms < 2.0, per_call_ms
