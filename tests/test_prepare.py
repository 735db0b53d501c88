"""Model preparation: the copy is fixed for explainers, the user's model never changes."""
from __future__ import annotations

import torch
from torch import nn

import esegeta
from esegeta.io.loading import load_model
from esegeta.attribution.prepare import CallSites, prepare, prepared

from conftest import assert_unchanged, hook_count, snapshot


def test_reused_and_inplace_relus_are_fixed_on_the_copy(digits):
    before = snapshot(digits.model)
    ready = prepare(digits.model, digits.x)
    assert isinstance(ready.layer("layer1.relu"), CallSites) and len(ready.layer("layer1.relu").sites) == 2
    assert not any(getattr(m, "inplace", False) for m in ready.modules())
    assert any("reused at 2 call sites" in c for c in ready.changes)
    assert any("non-inplace" in c for c in ready.changes)
    with torch.no_grad():
        torch.testing.assert_close(ready(digits.x), digits.model(digits.x))
    assert_unchanged(digits.model, before)
    assert digits.model.layer1.relu.inplace is True


def test_the_changes_are_summarised_by_kind_for_people():
    """A MONAI-style net with 13 in-place ReLUs reused at 2 call sites logged 26 lines per run;
    the summary says each kind once, with its count (the manifest keeps the full list)."""
    torch.manual_seed(0)
    relus = [nn.ReLU(inplace=True) for _ in range(4)]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(2, 2, 3, padding=1) for _ in range(4))
            self.acts = nn.ModuleList(relus)

        def forward(self, x):
            for conv, act in zip(self.convs, self.acts):
                x = act(conv(act(x)))
            return x.mean((2, 3))

    ready = prepare(Net().eval(), torch.rand(1, 2, 6, 6))
    assert len(ready.changes) == 8
    assert ready.summary() == ["4× in-place ReLU made non-inplace", "4× ReLU reused at 2 call sites, split into 2 modules"]
    assert ready.summary(listed=8) == ready.changes


def test_each_call_site_is_called_once_per_forward(digits):
    ready = prepare(digits.model, digits.x)
    calls = []
    handles = [m.register_forward_hook(lambda m, i, o: calls.append(id(m))) for m in ready.layer("layer1.relu").sites]
    with torch.no_grad():
        ready(digits.x)
        ready(digits.x)
    for h in handles:
        h.remove()
    assert len(calls) == 4 and len(set(calls)) == 2 and calls[:2] == calls[2:]


def test_training_mode_and_hooks_of_the_user_model_are_kept(digits):
    model = digits.model
    model.train()
    handle = model.fc.register_forward_hook(lambda m, i, o: None)
    try:
        before = snapshot(model)
        esegeta.explain(model, digits.x, "captum.DeepLift", target=3)
        esegeta.explain(model, digits.x, "captum.GuidedBackprop", target=3)
        esegeta.explain(model, digits.x, "captum.LRP", target=3)
        assert_unchanged(model, before)
        assert model.training
    finally:
        handle.remove()
        model.eval()


def test_the_prepared_copy_is_cached_until_weights_change(digits):
    import copy

    model = copy.deepcopy(digits.model)
    first = prepared(model, digits.x)
    assert prepared(model, digits.x) is first
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    second = prepared(model, digits.x)
    assert second is not first
    torch.testing.assert_close(second.model.fc.bias, model.fc.bias)


def test_hooks_are_removed_when_a_method_fails(digits):
    ready = prepared(digits.model, digits.x)
    try:
        esegeta.explain(digits.model, digits.x, "captum.IntegratedGradients", target=3, method="no-such-rule")
    except Exception:
        pass
    assert hook_count(ready) == 0 and hook_count(digits.model) == 0


def test_parameterised_reused_module_is_left_shared():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x.flatten(1))))

    model = Tied().eval()
    ready = prepare(model, torch.randn(1, 1, 2, 2))
    assert isinstance(ready.layer("lin"), nn.Linear)


def test_torchscript_weights_load_and_explain(tmp_path, digits):
    scripted = torch.jit.trace(digits.model, digits.x)
    path = tmp_path / "model.ts"
    scripted.save(str(path))
    model = load_model({"weights": str(path)}, None)
    attr = esegeta.explain(model, digits.x, "captum.IntegratedGradients", target=3, n_steps=8)
    ref = esegeta.explain(digits.model, digits.x, "captum.IntegratedGradients", target=3, n_steps=8)
    torch.testing.assert_close(attr, ref, rtol=1e-4, atol=1e-5)


def test_the_out_of_place_mode_runs_only_for_models_whose_code_operates_in_place():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            out = self.conv(x)
            out += x  # torchvision's BasicBlock does this
            return torch.nn.functional.relu(out, inplace=True)

    x = torch.randn(1, 1, 6, 6)
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(32, 2))
    assert prepare(plain, x).inplace_ops is False  # in-place modules are already made non-inplace
    assert prepare(Residual(), x).inplace_ops is True
