"""The ready configs and wrappers: each config validates and runs, each ready-made wrapper
is used by a config, and `esegeta demo` produces its overview."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from esegeta.cli.commands import main
from esegeta.run.runner import Pipeline

from conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.json"))
CONFIGS = [c for c in CONFIGS if c.name != "schema.json"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_validates(config):
    v = Pipeline(config).validate()
    assert v.methods and v.inputs


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_its_first_method(config, tmp_path):
    first = json.loads(config.read_text())["methods"][0]
    result = Pipeline(config, output_dir=tmp_path, only=[first.get("label", first["id"])]).run()
    assert result.exit_code == 0, result.runs
    assert all(r["status"] == "ok" for r in result.runs)
    assert (tmp_path / "manifest.json").is_file()


def test_every_ready_wrapper_is_used_by_a_config():
    used = " ".join(c.read_text() for c in CONFIGS)
    for wrapper in (ROOT / "wrappers").glob("*.py"):
        assert f"wrappers/{wrapper.name}:" in used, f"{wrapper.name} is not referenced by any config"


def test_3d_config_writes_nifti_with_the_input_affine(tmp_path):
    import nibabel as nib

    config = ROOT / "configs" / "anatomical3d.json"
    result = Pipeline(config, output_dir=tmp_path, only=["captum.Saliency", "gradcam-enc2"]).run()
    assert result.exit_code == 0
    source = nib.load(str(ROOT / "samples" / "data" / "anatomical.nii.gz"))
    by_label = {r["label"]: r for r in result.runs}
    saliency = nib.load(str(tmp_path / by_label["captum.Saliency"]["files"]["nii"]))
    assert saliency.shape == source.shape
    np.testing.assert_allclose(saliency.affine, source.affine)
    np.testing.assert_allclose(np.asarray(saliency.dataobj), np.load(tmp_path / by_label["captum.Saliency"]["files"]["npy"])[0])
    coarse = nib.load(str(tmp_path / by_label["gradcam-enc2"]["files"]["nii"]))
    assert coarse.shape != source.shape
    # The centre of the coarse grid lands on the centre of the input grid.
    centre = lambda img: img.affine @ np.r_[(np.array(img.shape[:3]) - 1) / 2, 1]  # noqa: E731
    np.testing.assert_allclose(centre(coarse), centre(source), atol=1e-4)


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "esegeta", "demo", "--output", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    labels = {r["label"] for r in manifest["runs"]}
    assert len(labels) >= 8
    assert all(r["status"] == "ok" for r in manifest["runs"])
    assert (out / "overview.png").stat().st_size > 10_000
    assert "Traceback" not in proc.stderr


def test_demo_refuses_nothing_when_called_in_process(tmp_path, capsys):
    assert main(["validate", str(ROOT / "configs" / "retina.json")]) == 0
    assert "valid" in capsys.readouterr().out
