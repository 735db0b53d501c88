"""`esegeta check`: a per-method pre-flight report from one forward pass, no attribution."""
from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from esegeta.run.check import check

from helpers_cli import REPO, run_cli, valid_config, write_config

SOFTPLUS_MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    class SoftplusNet(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.act = nn.LogSigmoid()  # no LRP rule: not monotone-positive, not in any rule table
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flat = nn.Flatten()
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(self.flat(self.pool(self.act(self.conv(x)))))
""")


def test_every_shipped_config_passes_the_check():
    for path in sorted((REPO / "configs").glob("*.json")):
        if path.name == "schema.json":
            continue
        report = check(path)
        assert report.exit_code == 0, (path.name, [(m.label, m.problems) for m in report.methods if not m.ok])
        assert report.heaviest is not None and report.heaviest.memory_bytes > report.weight_bytes


def test_problems_are_collected_per_method_and_nothing_is_attributed(tmp_path, capsys):
    methods = [
        {"id": "captum.Saliency"},
        {"id": "captum.LayerGradCam", "layer": "layer9"},                     # no such layer
        {"id": "captum.IntegratedGradients", "params": {"n_step": 8}},       # typo
        {"id": "captum.Saliency", "label": "bad-target", "target": 42},      # 10 classes
        {"id": "captum.LayerGradCam", "layer": "layer2", "label": "gc"},
        {"id": "captum.IntegratedGradients", "label": "ig", "params": {"n_steps": 64, "internal_batch_size": 16}},
    ]
    cfg = valid_config(tmp_path, methods)
    report = check(cfg, base_dir=tmp_path)
    verdict = {m.label: m for m in report.methods}
    assert verdict["captum.Saliency"].ok
    assert "layer9" in verdict["captum.LayerGradCam"].problems[0] and "did you mean" in verdict["captum.LayerGradCam"].problems[0]
    assert "n_steps" in verdict["captum.IntegratedGradients"].problems[0]
    assert "target 42 does not exist" in verdict["bad-target"].problems[0]
    assert verdict["gc"].ok and verdict["gc"].layer_shape == [1, 32, 4, 4]
    assert verdict["ig"].batch == 16
    assert report.heaviest.label == "ig"
    assert any("reused at 2 call sites" in c for c in report.prepared_changes)
    assert any("non-inplace" in c for c in report.prepared_changes)
    assert report.exit_code == 1
    assert not (tmp_path / "out").exists(), "check writes no results"

    code, out, _ = run_cli(["check", write_config(tmp_path, cfg), "--json"], capsys)
    assert code == 1
    data = json.loads(out)
    assert [m["ok"] for m in data["methods"]] == [True, False, False, False, True, True]
    assert data["heaviest"] == "ig"


def test_check_runs_no_backward_pass(tmp_path):
    from esegeta.io.loading import load_model
    from esegeta.attribution.prepare import prepared

    cfg = valid_config(tmp_path, [{"id": "captum.IntegratedGradients"}, {"id": "captum.LRP"}])
    check(cfg, base_dir=tmp_path)
    model = load_model(cfg["model"], tmp_path)
    x = torch.zeros(1, 1, 8, 8)
    assert all(p.grad is None for p in prepared(model, x).parameters())


def test_lrp_layers_without_a_rule_are_named(tmp_path, capsys):
    (tmp_path / "softplus_model.py").write_text(SOFTPLUS_MODEL)
    cfg = valid_config(tmp_path, [{"id": "captum.LRP"}, {"id": "captum.Saliency"}])
    cfg["model"] = {"factory": str(tmp_path / "softplus_model.py") + ":SoftplusNet"}
    report = check(cfg, base_dir=tmp_path)
    lrp, saliency = report.methods
    assert not lrp.ok and "act (LogSigmoid)" in lrp.problems[0]
    assert saliency.ok
    # and the verdict is true: the run refuses LRP before anything runs, naming the layer
    from esegeta.errors import ConfigError
    from esegeta.run.runner import Pipeline

    with pytest.raises(ConfigError, match="act \\(LogSigmoid\\)"):
        Pipeline(cfg, base_dir=tmp_path).run()
    code, out, _ = run_cli(["check", write_config(tmp_path, cfg)], capsys)
    assert code == 1 and "[NO] methods[0]" in out and "1/2 method(s) will run" in out


def test_a_segmentation_wrapper_on_a_classifier_is_reported(tmp_path):
    cfg = valid_config(tmp_path, [{"id": "captum.Saliency", "wrapper": {"name": "threshold"}}])
    report = check(cfg, base_dir=tmp_path)
    assert not report.methods[0].ok and "remove the wrapper for a classifier" in report.methods[0].problems[0]


def test_invalid_config_exits_2(tmp_path, capsys):
    cfg = valid_config(tmp_path, [{"id": "captum.Saliency"}], modle={})
    code, _, err = run_cli(["check", write_config(tmp_path, cfg)], capsys)
    assert code == 2 and "modle" in err


def test_check_predicts_passes_and_time(tmp_path):
    cfg = valid_config(tmp_path, methods=[{"id": "captum.IntegratedGradients", "params": {"n_steps": 24}},
                                          {"id": "captum.Saliency", "noise_tunnel": {"nt_samples": 6}}])
    report = check(cfg, base_dir=tmp_path)
    ig, smooth = report.methods
    assert (ig.forward_rows, ig.backward_rows) == (24, 24) and ig.passes_exact
    assert (smooth.forward_rows, smooth.backward_rows) == (6, 6)
    assert ig.seconds is not None and ig.seconds > 0
    assert "48 passes (24 forward + 24 backward)" in report.text()


def test_a_peak_over_the_free_memory_is_a_problem(tmp_path, monkeypatch):
    import esegeta.run.check as check_mod

    monkeypatch.setattr(check_mod, "available_memory", lambda device: 1024)
    report = check(valid_config(tmp_path), base_dir=tmp_path)
    assert report.exit_code == 1
    assert "exceeds the 1.0 KiB free" in report.methods[0].problems[0]


def test_canonizers_that_fail_on_the_model_are_found_before_the_run(tmp_path):
    """torchvision's DenseNet normalises concatenated features: zennit's SequentialMergeBatchNorm
    (pairing by module order) fails on it at run time; check tries the canonizers each entry
    will use, on a copy of the model, and says what to set."""
    cfg = valid_config(tmp_path, methods=[{"id": "zennit.EpsilonPlusFlat",
                                           "params": {"canonizers": ["SequentialMergeBatchNorm"]}},
                                          {"id": "zennit.EpsilonPlusFlat", "label": "default"},
                                          {"id": "zennit.EpsilonPlusFlat", "label": "plain", "params": {"canonizers": []}}],
                       model={"factory": "torchvision.models:DenseNet",
                              "kwargs": {"growth_rate": 4, "block_config": [2, 2], "num_init_features": 8,
                                         "num_classes": 3}},
                       inputs={"paths": [str(REPO / "samples" / "data" / "retina_crop.png")], "spatial_dims": 2,
                               "resize": [32, 32]})
    report = check(cfg, base_dir=tmp_path)
    sequential, default, plain = report.methods
    assert not sequential.ok and "params.canonizers" in sequential.problems[0] and "[]" in sequential.problems[0]
    assert default.ok and any("tried on a copy" in n for n in default.notes)
    assert plain.ok


def _global_3d_config(tmp_path, memory_gb=None, patch_batch=4):
    cfg = json.loads((REPO / "configs" / "anatomical3d.json").read_text())
    cfg.pop("$schema")
    cfg["model"] = {"factory": str(REPO / "samples" / "models.py") + ":TissueUNet3D",
                    "weights": str(REPO / "samples" / "checkpoints" / "tissue_unet3d.pt")}
    cfg["inputs"]["paths"] = [str(REPO / "samples" / "data" / "anatomical.nii.gz")]
    cfg["output"] = {"dir": str(tmp_path / "out")}
    cfg["patch"] = {"size": [16, 16, 16], "mode": "global", "batch_size": patch_batch}
    cfg["runtime"] = {"devices": "cpu", **({"memory_gb": memory_gb} if memory_gb is not None else {})}
    cfg["methods"] = [{"id": "captum.IntegratedGradients", "params": {"n_steps": 16, "internal_batch_size": 8}}]
    return cfg


def test_global_patches_are_planned_to_the_memory_budget(tmp_path):
    """runtime.memory_gb is the budget check plans to: in global mode the peak is a patch's
    activations (rows × patch.batch_size patches per call) plus a few input volumes, and the
    report names the patch.batch_size that fits."""
    from esegeta.run.check import VOLUME_COPIES

    roomy = check(_global_3d_config(tmp_path, memory_gb=64), base_dir=tmp_path)
    ig = roomy.methods[0]
    assert ig.ok and ig.batch == 8
    assert roomy.forward_shape == [16, 16, 16]  # every method global: check's forward pass runs on one patch
    volume = 4 * math.prod(roomy.input_shape)
    whole = 2 * roomy.activation_bytes * math.prod(roomy.input_shape) / 16**3 * ig.batch  # unpatched, 8 rows
    assert 2 * volume < ig.memory_bytes < whole
    # IG is streamed in global mode (esegeta.attribution.streamed): where patches tile the input, input,
    # result and the masks as bits instead of nine volumes and the stitched output
    from esegeta.run.check import STREAMED_ACTIVATIONS, _Forward, planned_peak
    from esegeta.spec.request import from_arguments

    x = torch.zeros(1, 1, 32, 48, 16)
    volume = 4 * x.numel()
    forward = _Forward({}, [1, 3, 16, 16, 16], roomy.activation_bytes, 0, 0.0, voxels=16**3)
    request = from_arguments("captum.IntegratedGradients", target=2, wrapper={"name": "multiclass"},
                             patch={"size": [16, 16, 16], "mode": "global", "batch_size": 4},
                             params={"n_steps": 16, "internal_batch_size": 8})
    plain = planned_peak(forward, x, 8, request.patch)
    streamed = planned_peak(forward, x, 8, request.patch, request=request)
    activations = 2 * roomy.activation_bytes * 8 * 4  # 8 rows × 4 patches per call
    expected = (plain - activations + activations / 2 * STREAMED_ACTIVATIONS  # saved activations, not their grads
                - (VOLUME_COPIES + 3) * volume + 2 * volume + 3 * volume // 32)  # input, result; masks as bits
    assert streamed == pytest.approx(expected, abs=2)
    assert ig.fitting_batch is not None and ig.fitting_batch > 4
    assert any("runtime.memory_gb budget (64.0 GiB): patch.batch_size up to" in n for n in ig.notes)
    # a budget under the planned peak: a problem naming the patch.batch_size that fits
    tight = check(_global_3d_config(tmp_path, memory_gb=0.8 * ig.memory_bytes / 2**30), base_dir=tmp_path).methods[0]
    assert not tight.ok and "runtime.memory_gb budget" in tight.problems[0]
    assert any(f"set patch.batch_size to {n} or less" in tight.problems[0] for n in (1, 2, 3)), tight.problems
