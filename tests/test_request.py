"""The request: one immutable value, resolved once; the call path imports no config and no explainer."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from torch import nn

import esegeta
from esegeta.spec import config as config_mod
from esegeta.errors import ConfigError
from esegeta.spec.config import resolve
from esegeta.spec.request import PatchConfig, Request, WrapperConfig, from_arguments

from conftest import ROOT


def test_the_call_path_imports_neither_config_nor_explainer():
    code = ("import esegeta.attribution.call, esegeta.attribution.patcher, sys; "
            "assert 'esegeta.spec.config' not in sys.modules, 'config'; "
            "assert 'esegeta.attribution.explainer' not in sys.modules, 'explainer'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_request_is_immutable():
    request = from_arguments("captum.IntegratedGradients", target=3, wrapper={"name": "threshold"},
                             patch={"size": [8, 8]}, noise_tunnel={"nt_samples": 2}, params={"n_steps": 8})
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.target = 1
    with pytest.raises(TypeError):
        request.params["n_steps"] = 4
    with pytest.raises(TypeError):
        request.noise_tunnel["nt_samples"] = 4
    with pytest.raises(ValueError):  # pydantic's frozen models
        request.wrapper.threshold = 0.3
    with pytest.raises(ValueError):
        request.patch.mode = "global"


def test_replace_makes_a_new_request_and_keeps_the_old():
    request = Request(from_arguments("captum.Saliency").spec, {"abs": True})
    smaller = request.replace(params={"abs": False})
    assert request.params == {"abs": True} and smaller.params == {"abs": False}
    assert smaller.spec is request.spec


def test_from_arguments_validates_with_the_field_path():
    with pytest.raises(ConfigError, match="^wrapper.name: unknown wrapper .thresold.; .*did you mean threshold"):
        from_arguments("captum.Saliency", wrapper={"name": "thresold"})
    with pytest.raises(ConfigError, match="^patch.mode:"):
        from_arguments("captum.Saliency", patch={"size": [8, 8], "mode": "nope"})
    with pytest.raises(ConfigError, match="^method:"):
        from_arguments("captum.Salincy")
    assert from_arguments("captum.Saliency", wrapper=WrapperConfig(name="multiclass")).wrapper.reduction == "sum"


def _config(**entry) -> config_mod.Config:
    return config_mod.parse({
        "model": {"factory": "m.py:make"}, "inputs": {"paths": ["x.npy"], "spatial_dims": 2},
        "wrapper": {"name": "threshold"}, "target": 1, "patch": {"size": [8, 8]},
        "runtime": {"timeout_s": 9.0}, "methods": [{"id": "captum.Saliency"}, {"id": "captum.Saliency", **entry}],
    })


def test_resolve_takes_the_entry_value_else_the_config_value():
    config = _config(label="own", target=0, wrapper={"name": "multiclass"}, timeout_s=2.0, device="cpu",
                     patch={"size": [4, 4], "mode": "global"})
    top, own = resolve(config.methods[0], config, 0), resolve(config.methods[1], config, 1)
    assert (top.request.target, top.request.wrapper.name, top.request.patch.size, top.timeout_s, top.device) == \
        (1, "threshold", [8, 8], 9.0, None)
    assert (own.request.target, own.request.wrapper.name, own.request.patch.size, own.timeout_s, own.device) == \
        (0, "multiclass", [4, 4], 2.0, "cpu")
    assert top.where("target") == "target" and own.where("target") == "methods[1].target"
    assert own.label == "own" and top.label == "captum.Saliency"
    assert isinstance(own.request.patch, PatchConfig)


def test_resolve_keeps_a_target_of_zero_set_on_the_entry():
    config = _config(label="zero", target=0)
    assert resolve(config.methods[1], config, 1).request.target == 0


SEEN: list[bool] = []  # module-level: explain runs a deep copy of the model


class _Flags(nn.Module):
    """A classifier that records whether TF32 is allowed while it computes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        SEEN.append(bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32))
        return self.fc(x.flatten(1))


def test_explain_computes_without_tf32_and_restores_the_callers_setting():
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    SEEN.clear()
    try:
        attr = esegeta.explain(_Flags(), torch.rand(1, 1, 2, 2), "captum.Saliency", 1)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert attr.shape == (1, 1, 2, 2)
    assert SEEN and not any(SEEN), SEEN  # the prepared copy's forward passes and the method's


def test_out_of_memory_retry_builds_a_new_request():
    from esegeta.run.job import _halved

    request = from_arguments("captum.IntegratedGradients", params={"n_steps": 10})
    smaller = _halved(request)
    assert smaller.params == {"n_steps": 10, "internal_batch_size": 5} and request.params == {"n_steps": 10}
    assert _halved(from_arguments("captum.IntegratedGradients", params={"internal_batch_size": 1})) is None
