"""Trained nnU-Net v2 models (``model.nnunet``): loaded with nnU-Net's own code, its plans as the input
transform and patch defaults, maps written back in the source geometry (esegeta/io/nnunet.py).

The trained-model folders (3d_fullres and 2d) are built by tests/nnunet_folder.py with nnU-Net's own
classes: a freshly initialised network in the checkpoint form its trainer saves. The case explained has
another spacing than the plans' (0.8 × 1 × 2.5 against 1 × 1 × 2), so it is resampled on the way in and
the maps on the way out.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")
nib = pytest.importorskip("nibabel")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nnunet_folder  # noqa: E402
from helpers_cli import run_cli, write_config  # noqa: E402

import esegeta  # noqa: E402
from esegeta.errors import ConfigError  # noqa: E402
from esegeta.io import datasets, nnunet  # noqa: E402
from esegeta.spec.sections import InputsConfig, ModelConfig  # noqa: E402

CASE_SHAPE, CASE_SPACING = (28, 24, 12), (0.8, 1.0, 2.5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nnunet")
    found = {c: nnunet_folder.trained_folder(root, c) for c in ("3d_fullres", "2d", "3d_resenc")}
    nnunet_folder.write_cases(root / "cases", 1, CASE_SHAPE, spacing=CASE_SPACING)
    found["cases"] = root / "cases"
    return found


def _case(folders, configuration: str):
    model = ModelConfig(nnunet=str(folders[configuration]))
    source = datasets.source(InputsConfig(paths=[str(folders["cases"])], spatial_dims=3), None, model)
    return nnunet.open_trained(model, None), source.load(0)


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d", "3d_resenc"])
def test_network_equals_nnunet_predictor(folders, configuration):
    """The network esegeta loads gives the logits of nnU-Net's own predictor's network on the same
    preprocessed patch (a 2D configuration: slice by slice), and of its sliding window (one tile; the
    predictor keeps CPU results in float16 and weighs the tile by a Gaussian that underflows to 0 at its
    corners, so where the weight is large); deep supervision off, eval mode."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trained, item = _case(folders, configuration)
    network = trained.network()
    assert not network.training
    assert item.tensor.shape[:2] == (1, 2)  # two channels, one per file
    # the case (0.8 × 1 × 2.5 mm, 28 × 24 × 12) resampled to the plans' 1 × 1 × 2 mm, in nnU-Net's (z, y, x);
    # a 2D configuration keeps the spacing between slices; padded with zeros to a multiple of the
    # network's downsampling (2 × 4 × 4; nnU-Net's predictor pads to the patch)
    assert item.geometry.shape == ((12, 24, 22) if configuration == "2d" else (15, 24, 22))
    assert item.tensor.shape[2:] == ((12, 24, 24) if configuration == "2d" else (16, 24, 24))
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folders[configuration]), (0,), "checkpoint_final.pth")
    patch = item.tensor[..., :12, :16, :16]  # one patch of the 3D plans: nnU-Net's sliding window is one tile
    with torch.no_grad():
        ours = network(patch)
        theirs = nnunet.SliceWise(predictor.network)(patch) if configuration == "2d" else predictor.network(patch)
        window = predictor.predict_sliding_window_return_logits(patch[0])
    assert torch.is_tensor(ours) and ours.shape == (1, 3, 12, 16, 16)  # three classes, no deep-supervision list
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    centre = (slice(None), slice(None) if configuration == "2d" else slice(4, 8), slice(5, 11), slice(5, 11))
    torch.testing.assert_close(ours[0][centre], window[centre].float(), atol=3e-3, rtol=1e-2)


def test_case_geometry_round_trip(folders):
    """The preprocessed input written back lands on the source grid: it matches nnU-Net's CT
    normalisation of the source file voxel by voxel (resampled there and back), and it reads back."""
    trained, item = _case(folders, "3d_fullres")
    back = item.own_order(item.tensor[0].numpy())
    assert back.shape == (2, *CASE_SHAPE)
    ct = np.asarray(nib.load(str(folders["cases"] / "case_000_0000.nii.gz")).dataobj, dtype=np.float64)
    props = trained.plans["foreground_intensity_properties_per_channel"]["0"]
    expected = (np.clip(ct, props["percentile_00_5"], props["percentile_99_5"]) - props["mean"]) / props["std"]
    assert np.corrcoef(back[0].ravel(), expected.ravel())[0, 1] > 0.98
    again = item.model_order(back)
    assert again.shape == tuple(item.tensor.shape[1:])
    inside = (slice(None), *[slice(0, s) for s in item.geometry.shape])
    assert np.corrcoef(again[inside].ravel(), item.tensor[0].numpy()[inside].ravel())[0, 1] > 0.98
    assert not again[:, 15:].any()  # the padding


def test_run_writes_maps_in_the_source_geometry(folders, tmp_path):
    """``esegeta run`` on the 2-channel case: the plans' patch as the global-mode default, maps of the
    source file's shape with its affine, IG complete (esegeta's conservation record)."""
    config = {"model": {"nnunet": str(folders["3d_fullres"]), "fold": 0, "checkpoint": "checkpoint_final.pth"},
              "inputs": {"paths": [str(folders["cases"] / "case_000_000*.nii.gz")], "spatial_dims": 3},
              "wrapper": {"name": "multiclass", "activation": "softmax"}, "target": 1,
              "runtime": {"devices": "cpu"}, "output": {"dir": str(tmp_path / "out"), "formats": ["npy", "nii"]},
              "methods": [{"id": "captum.IntegratedGradients",
                           "params": {"n_steps": 8, "internal_batch_size": 8, "baselines": "blur"}}]}
    result = esegeta.Pipeline(config).run()
    assert result.exit_code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["patch"] == {"size": [12, 16, 16], "overlap": [6, 8, 8], "mode": "global",
                                           "blend": "hann", "batch_size": 4}
    (run,) = manifest["runs"]
    assert run["input"] == "case_000" and run["status"] == "ok"
    conservation = run["conservation"]
    assert conservation["axiom"] == "completeness" and conservation["holds"], conservation
    assert abs(conservation["ratio"] - 1) < 0.05
    source = nib.load(str(folders["cases"] / "case_000_0000.nii.gz"))
    written = nib.load(str(tmp_path / "out" / run["files"]["nii"]))
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert written.shape == (*CASE_SHAPE, 2)
    saved = np.load(tmp_path / "out" / run["files"]["npy"])
    assert saved.shape == (2, *CASE_SHAPE) and np.isfinite(saved).all() and np.abs(saved).sum() > 0


def test_2d_configuration_explains_a_volume_slice_by_slice(folders, tmp_path):
    config = {"model": {"nnunet": str(folders["2d"])},
              "inputs": {"paths": [str(folders["cases"])], "spatial_dims": 3},
              "wrapper": {"name": "multiclass", "activation": "softmax"}, "target": 1,
              "runtime": {"devices": "cpu"}, "output": {"dir": str(tmp_path / "out"), "formats": ["npy", "nii"]},
              "methods": [{"id": "captum.Saliency"}]}
    result = esegeta.Pipeline(config).run()
    assert result.exit_code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["patch"] == {"size": [1, 16, 16], "overlap": [0, 8, 8], "mode": "global",
                                           "blend": "hann", "batch_size": 4}  # the plans' patch, one slice deep
    (run,) = manifest["runs"]
    assert run["status"] == "ok", run
    assert np.load(tmp_path / "out" / run["files"]["npy"]).shape == (2, *CASE_SHAPE)


def test_2d_configuration_on_2d_cases(folders, tmp_path):
    """A one-slice case with spatial_dims 2: the network straight, layer methods too (then local patches)."""
    nnunet_folder.write_cases(tmp_path / "flat", 1, (24, 20, 1), spacing=(1.0, 1.0, 2.0))
    config = {"model": {"nnunet": str(folders["2d"])},
              "inputs": {"paths": [str(tmp_path / "flat")], "spatial_dims": 2},
              "wrapper": {"name": "multiclass", "activation": "softmax"}, "target": 1,
              "runtime": {"devices": "cpu"}, "output": {"dir": str(tmp_path / "out"), "formats": ["npy"]},
              "methods": [{"id": "captum.Saliency"}, {"id": "captum.LayerGradCam", "layer": "network.encoder.stages.2"}]}
    result = esegeta.Pipeline(config).run()
    assert result.exit_code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    # a layer method cannot run in global mode: the plans' patches, explained locally
    assert manifest["config"]["patch"]["size"] == [16, 16] and manifest["config"]["patch"]["mode"] == "local"
    for run in manifest["runs"]:
        assert run["status"] == "ok", run
        assert np.load(tmp_path / "out" / run["files"]["npy"]).shape[1:] == (24, 20)


def _bad(folders, tmp_path, name: str) -> tuple[dict, str]:
    """A config with one fault, and the field its message must name."""
    good = {"model": {"nnunet": str(folders["3d_fullres"])},
            "inputs": {"paths": [str(folders["cases"])], "spatial_dims": 3},
            "wrapper": {"name": "multiclass"}, "output": {"dir": str(tmp_path / "out")},
            "methods": [{"id": "captum.Saliency"}]}
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    lonely = tmp_path / "lonely"
    lonely.mkdir(exist_ok=True)
    (lonely / "case_000_0000.nii.gz").write_bytes((folders["cases"] / "case_000_0000.nii.gz").read_bytes())
    faults = {
        "folder": ({"nnunet": str(tmp_path / "nowhere")}, "model.nnunet"),
        "plans": ({"nnunet": str(empty)}, "model.nnunet"),
        "fold": ({"nnunet": str(folders["3d_fullres"]), "fold": 3}, "model.fold"),
        "checkpoint": ({"nnunet": str(folders["3d_fullres"]), "checkpoint": "checkpoint_best.pth"}, "model.checkpoint"),
        "factory": ({"nnunet": str(folders["3d_fullres"]), "factory": "x.py:f"}, "model.factory"),
        "fold_alone": ({"factory": "x.py:f", "fold": 0}, "model.fold"),
    }
    if name in faults:
        model, field = faults[name]
        return {**good, "model": model}, field
    if name == "channel":
        return {**good, "inputs": {"paths": [str(lonely)], "spatial_dims": 3}}, "inputs.paths"
    if name == "spatial_dims":
        return {**good, "inputs": {**good["inputs"], "spatial_dims": 2}}, "inputs.spatial_dims"
    return {**good, "inputs": {**good["inputs"], "normalize": "zscore"}}, "inputs.normalize"


@pytest.mark.parametrize("name", ["folder", "plans", "fold", "checkpoint", "factory", "fold_alone", "channel",
                                  "spatial_dims", "normalize"])
def test_bad_configs_exit_2_naming_the_field(folders, tmp_path, capsys, name):
    config, field = _bad(folders, tmp_path, name)
    code, _, err = run_cli(["validate", write_config(tmp_path, config)], capsys)
    assert code == 2, err
    assert field in err and "Traceback" not in err, err


def test_slice_wise_on_the_data_device(folders):
    """A 2D configuration on a volume creates no tensor of its own: it runs on torch's meta device."""
    trained = nnunet.open_trained(ModelConfig(nnunet=str(folders["2d"])), None)
    network = trained.network().to("meta")
    out = network(torch.zeros(1, 2, 3, 16, 16, device="meta"))
    assert out.device.type == "meta" and out.shape == (1, 3, 3, 16, 16)


def test_a_missing_nnunetv2_names_the_extra(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # import nnunetv2 raises ImportError
    with pytest.raises(ConfigError, match=r"esegeta\[nnunet\]") as caught:
        nnunet.open_trained(ModelConfig(nnunet=str(folders["3d_fullres"])), None)
    assert caught.value.path == "model.nnunet"
