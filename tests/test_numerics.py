"""Numbers a user can trust: fp32 means fp32 (TF32 off unless asked), mixed precision only for
methods measured safe, NaN never a success, flat maps flagged, strict JSON manifests.

Real runs of the sample digits model and of small models of this file's own (written to a model
file the config names), not mocks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from esegeta.attribution import numerics
from esegeta.spec import registry
from esegeta.errors import ConfigError
from esegeta.run.runner import Pipeline
from esegeta.attribution.verdicts import flat_result_warning
from helpers_cli import DIGITS, FACTORY, WEIGHTS

ONE = DIGITS / "digit_30_label3.npy"

MODELS = '''
import torch
from torch import nn


class TF32Refusing(nn.Module):
    """Raises when it runs with TF32 allowed for cuDNN or cuBLAS (the process-wide flags)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        if torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32:
            raise RuntimeError("computing with TF32 allowed")
        return self.fc(x.flatten(1))


class NaNOutput(nn.Module):
    """A model whose output holds NaN."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out * torch.full_like(out, float("nan"))


class Flat(nn.Module):
    """A model whose scores do not depend on its input: every gradient is zero."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1) * 0.0)
'''


def config(tmp_path: Path, methods: list[dict], model: str | None = None, inputs=(ONE,), **runtime) -> dict:
    cfg = {
        "model": {"factory": FACTORY, "weights": str(WEIGHTS)},
        "inputs": {"paths": [str(p) for p in inputs], "spatial_dims": 2},
        "target": 3,
        "runtime": {"devices": "cpu", "seed": 0, **runtime},
        "output": {"dir": str(tmp_path / "out"), "formats": ["npy"]},
        "methods": methods,
    }
    if model is not None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        (tmp_path / "own_models.py").write_text(MODELS)
        cfg["model"] = {"factory": f"{tmp_path / 'own_models.py'}:{model}"}
    return cfg


def strict_json(path: Path) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON literal {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


# -- TF32 ----------------------------------------------------------------------------
def test_fp32_numerics_turns_tf32_off_and_restores_the_callers_flags():
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with numerics.fp32_numerics():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        with pytest.raises(KeyError), numerics.fp32_numerics(tf32=True):
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
            raise KeyError("restored even on error")
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_fp32_numerics_keeps_to_the_new_api_when_the_process_uses_it():
    """torch refuses the legacy getters once ``fp32_precision`` was set; then only the new API
    is used, and the caller's values come back (a fresh interpreter: that state is sticky)."""
    code = """
import torch
from esegeta.attribution.numerics import fp32_numerics
b = torch.backends
b.cuda.matmul.fp32_precision = "tf32"; b.cudnn.conv.fp32_precision = "tf32"; b.cudnn.rnn.fp32_precision = "tf32"
with fp32_numerics():
    inside = (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision)
after = (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision)
print(inside, after)
assert inside == ("ieee",) * 3 and after == ("tf32",) * 3
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_run_computes_without_tf32_unless_asked_and_restores_the_process(tmp_path):
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True  # torch's default
        plain = Pipeline(config(tmp_path / "a", [{"id": "captum.Saliency"}], "TF32Refusing")).run()
        assert plain.runs[0]["status"] == "ok" and plain.runs[0]["tf32"] is False
        assert torch.backends.cudnn.allow_tf32, "the run changed the process's flag"
        with pytest.raises(ConfigError, match="computing with TF32 allowed"):  # its validating forward pass
            Pipeline(config(tmp_path / "b", [{"id": "captum.Saliency"}], "TF32Refusing", tf32=True)).run()
        assert torch.backends.cudnn.allow_tf32
        asked = Pipeline(config(tmp_path / "c", [{"id": "captum.Saliency"}], tf32=True)).run()
        assert asked.runs[0]["tf32"] is False  # TF32 exists on CUDA only: the CPU computed in fp32 anyway
    finally:
        torch.backends.cudnn.allow_tf32 = before


# -- mixed precision -----------------------------------------------------------------
def _measured(safe: bool) -> str:
    """A cheap digits method the measured table calls (un)safe in bf16."""
    for method_id in ("captum.Saliency", "captum.InputXGradient", "captum.IntegratedGradients",
                      "captum.LRP", "zennit.EpsilonPlus", "captum.GuidedBackprop", "captum.Deconvolution"):
        if registry.get(method_id).amp_safety("bf16")[0] is safe:
            return method_id
    pytest.fail(f"no cheap digits method measured {'safe' if safe else 'unsafe'} in bf16")


def test_every_registered_method_has_a_measured_verdict_in_both_reduced_precisions():
    table = registry.amp_safety_table()
    assert table["min_r"] >= 0.95
    for method_id in registry.all_methods():
        for precision in ("bf16", "fp16"):
            row = table["methods"][method_id][precision]
            assert isinstance(row["safe"], bool) and row["reason"], (method_id, precision)
    shown = {row["id"]: row["amp"] for row in map(lambda s: s.row(), registry.all_methods().values())}
    assert shown["captum.Saliency"]["bf16"]["safe"] == table["methods"]["captum.Saliency"]["bf16"]["safe"]


def test_amp_runs_only_methods_measured_safe_in_reduced_precision(tmp_path):
    safe, unsafe = _measured(True), _measured(False)
    result = Pipeline(config(tmp_path, [{"id": safe}, {"id": unsafe}], amp=True)).run()
    by_id = {r["method"]: r for r in result.runs}
    assert by_id[safe]["status"] == by_id[unsafe]["status"] == "ok"
    assert by_id[safe]["precision"] == "bf16" and "measured safe in bf16" in by_id[safe]["precision_reason"]
    assert by_id[unsafe]["precision"] == "fp32"
    assert by_id[unsafe]["precision_reason"].startswith("amp: not shown safe in bf16")
    assert registry.get(unsafe).amp_safety("bf16")[1] in by_id[unsafe]["precision_reason"]
    plain = Pipeline(config(tmp_path / "fp32", [{"id": unsafe}])).run()
    assert np.array_equal(plain.result(unsafe), result.result(unsafe)), "the unsafe method was not computed in fp32"


def test_an_unmeasured_method_is_not_shown_safe():
    spec = registry.get("captum.Saliency")
    unmeasured = registry.MethodSpec("captum", "NotMeasured", spec.kind, spec.adapter, spec.requires, spec.extra)
    plan = numerics.precision_plan(unmeasured, torch.device("cpu"), amp=True)
    assert plan.attempts == ("fp32",) and "not measured in bf16" in plan.reason
    assert numerics.precision_plan(spec, torch.device("cuda"), amp=False).attempts == ("fp32",)


# -- non-finite and flat results -------------------------------------------------------
def test_a_nan_in_the_input_fails_the_result_and_names_the_input(tmp_path):
    digit = np.load(ONE).astype(np.float32)
    digit[0, 2, 3] = np.nan
    np.save(tmp_path / "nan_digit.npy", digit)
    result = Pipeline(config(tmp_path, [{"id": "captum.Saliency"}, {"id": "captum.IntegratedGradients"}],
                             inputs=(tmp_path / "nan_digit.npy", ONE))).run()
    assert result.exit_code == 1
    for record in result.runs:
        if record["input"] == "nan_digit":
            assert record["status"] == "failed" and record["files"] == {}
            assert record["error"].startswith("the input holds 1 NaN of 64 values")
        else:
            assert record["status"] == "ok", record
    manifest = strict_json(result.output_dir / "manifest.json")
    assert [r["status"] for r in manifest["runs"]] == [r["status"] for r in result.runs]


def test_a_model_that_outputs_nan_fails_the_result_and_the_manifest_stays_strict_json(tmp_path):
    result = Pipeline(config(tmp_path, [{"id": "captum.Saliency"}], "NaNOutput")).run()
    record = result.runs[0]
    assert result.exit_code == 1 and record["status"] == "failed"
    assert "the model's output on this input holds 10 NaN" in record["error"]
    manifest = strict_json(result.output_dir / "manifest.json")
    assert manifest["runs"][0]["score"] is None  # NaN is written as null


def test_a_flat_result_is_ok_with_a_warning_naming_the_cause(tmp_path):
    result = Pipeline(config(tmp_path, [{"id": "captum.Saliency"}], "Flat")).run()
    record = result.runs[0]
    assert record["status"] == "ok" and result.exit_code == 0
    assert len(record["warnings"]) == 1 and "all zero" in record["warnings"][0]
    assert "gradient of the explained score vanishes" in record["warnings"][0]
    normal = Pipeline(config(tmp_path / "normal", [{"id": "captum.Saliency"}])).run()
    assert normal.runs[0]["warnings"] == []


def test_a_flat_surrogate_names_its_sample_count():
    spec = registry.get("captum.KernelShap")
    warning = flat_result_warning(torch.zeros(1, 1, 8, 8), {"n_samples": 3}, spec.adapter.parameters(spec), 2.5)
    assert "n_samples: 3" in warning and "fewer samples than features" in warning
    constant = flat_result_warning(torch.full((1, 1, 4, 4), 0.25), {}, {}, 0.0)
    assert "constant (0.25" in constant and "score is 0" in constant
    assert flat_result_warning(torch.arange(4.0), {}, {}, 1.0) is None
