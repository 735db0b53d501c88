"""``output.summaries`` and ``esegeta.summaries``: relevance per region of a label map and per input channel.

Real runs of the sample models (the 3D tissue U-Net with its label volume as the atlas, the 2D vessel
U-Net on an RGB image with its vessel map), totals checked against NumPy on the saved maps, and the
refusals (a label map of another shape, channel names that do not fit) exit 2 naming the field.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import esegeta
from esegeta.errors import ConfigError
from esegeta.run.runner import Pipeline
from tests.helpers_cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "samples" / "data"
VOLUME, ATLAS = DATA / "anatomical.nii.gz", DATA / "anatomical_label.nii.gz"
RETINA, VESSELS = DATA / "retina_crop.png", DATA / "retina_crop_vessels.png"


def tissue_config(out: Path, summaries: dict, methods: list[dict] | None = None) -> dict:
    return {"model": {"factory": "samples/models.py:TissueUNet3D", "weights": "samples/checkpoints/tissue_unet3d.pt"},
            "inputs": {"paths": [str(VOLUME)], "spatial_dims": 3, "normalize": "zscore"},
            "wrapper": {"name": "multiclass", "activation": "softmax"}, "target": 2,
            "output": {"dir": str(out), "formats": ["npy"], "summaries": summaries},
            "methods": methods or [{"id": "captum.IntegratedGradients", "params": {"n_steps": 4}},
                                   {"id": "captum.LayerGradCam", "layer": "enc2", "label": "gradcam"}]}


def retina_config(out: Path, summaries: dict) -> dict:
    return {"model": {"factory": "samples/models.py:VesselUNet2D", "weights": "samples/checkpoints/vessel_unet2d.pt"},
            "inputs": {"paths": [str(RETINA)], "spatial_dims": 2},
            "wrapper": {"name": "threshold", "channel": 0, "threshold": 0.5, "activation": "sigmoid"}, "target": 1,
            "output": {"dir": str(out), "formats": ["npy"], "summaries": summaries},
            "methods": [{"id": "captum.InputXGradient"}]}


def direct_regions(attr: np.ndarray, labels: np.ndarray) -> dict[int, tuple[int, float, float]]:
    """(voxels, sum, positive) per label id, the plain NumPy way."""
    relevance = attr.astype(np.float64).sum(axis=0)
    return {int(k): (int((labels == k).sum()), float(relevance[labels == k].sum()),
                     float(np.maximum(relevance[labels == k], 0).sum())) for k in np.unique(labels)}


def rows_of(record: dict, kind: str) -> list[dict]:
    return [row for row in record["summaries"]["rows"] if row["kind"] == kind]


def check_regions(rows: list[dict], attr: np.ndarray, labels: np.ndarray) -> None:
    expected = direct_regions(attr, labels)
    assert {row["key"] for row in rows} == set(expected)
    positive_total = sum(p for _, _, p in expected.values())
    for row in rows:
        voxels, total, positive = expected[row["key"]]
        assert row["voxels"] == voxels
        assert row["sum"] == pytest.approx(total, rel=1e-6, abs=1e-9)
        assert row["mean"] == pytest.approx(total / voxels, rel=1e-6, abs=1e-12)
        assert row["share_positive"] == pytest.approx(positive / positive_total, rel=1e-6)
    assert sum(row["share_positive"] for row in rows) == pytest.approx(1.0)
    assert sum(row["share_abs"] for row in rows) == pytest.approx(1.0)


def test_3d_atlas_run_totals_match_numpy_in_manifest_csv_and_report(tmp_path):
    out = tmp_path / "out"
    names = {"0": "background", "1": "tissue A", "2": "tissue B"}
    result = Pipeline(tissue_config(out, {"labels": str(ATLAS), "names": names}), base_dir=ROOT).run()
    assert result.exit_code == 0, [r["error"] for r in result.runs]
    atlas = np.asarray(nib.load(str(ATLAS)).dataobj).astype(np.int64)
    for record in result.runs:
        attr = np.load(out / record["files"]["npy"])
        if record["label"] == "gradcam":  # one channel at the layer's resolution: no regions, no channels
            assert attr.shape[1:] != atlas.shape
            assert record["summaries"]["rows"] == []
            assert any("layer-resolution" in note for note in record["summaries"]["notes"])
            continue
        regions = rows_of(record, "region")
        check_regions(regions, attr, atlas)
        assert [row["name"] for row in regions] == ["background", "tissue A", "tissue B"]
        (channel,) = rows_of(record, "channel")  # one input channel: all of it
        assert channel["sum"] == pytest.approx(float(attr.astype(np.float64).sum()), rel=1e-6)
        assert channel["share_abs"] == pytest.approx(1.0)
    with open(out / "summaries.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert {line["label"] for line in lines} == {"captum.IntegratedGradients"}
    ig = next(r for r in result.runs if r["label"] == "captum.IntegratedGradients")
    tumour = next(line for line in lines if line["label"] == ig["label"] and line["kind"] == "region"
                  and line["key"] == "2")
    assert float(tumour["sum"]) == pytest.approx(rows_of(ig, "region")[2]["sum"], rel=1e-9)
    assert tumour["name"] == "tissue B" and tumour["labels"] == str(ATLAS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summaries"] == "summaries.csv"
    assert manifest["runs"][0]["summaries"]["rows"] == result.runs[0]["summaries"]["rows"]
    report = (out / "report.html").read_text()
    assert "Relevance per region and channel" in report and "tissue B" in report
    assert "gradcam: no region totals" in report  # why a method has none, said


def test_3d_prediction_is_the_models_argmax(tmp_path):
    out = tmp_path / "out"
    result = Pipeline(tissue_config(out, {"labels": "prediction"}, [{"id": "captum.Saliency"}]), base_dir=ROOT).run()
    assert result.exit_code == 0
    (record,) = result.runs
    x = torch.from_numpy(np.asarray(nib.load(str(VOLUME)).dataobj, dtype=np.float32))[None, None]
    x = (x - x.mean()) / x.std()
    from samples.models import TissueUNet3D

    model = TissueUNet3D()
    model.load_state_dict(torch.load(ROOT / "samples/checkpoints/tissue_unet3d.pt", weights_only=True))
    with torch.no_grad():
        predicted = model.eval()(x)[0].argmax(0).numpy()
    assert record["summaries"]["labels"] == "prediction"
    check_regions(rows_of(record, "region"), np.load(out / record["files"]["npy"]), predicted)


def test_2d_rgb_atlas_channels_share_one(tmp_path):
    out = tmp_path / "out"
    result = Pipeline(retina_config(out, {"labels": str(VESSELS), "channels": ["red", "green", "blue"],
                                          "names": {"255": "vessel"}}), base_dir=ROOT).run()
    assert result.exit_code == 0
    (record,) = result.runs
    attr = np.load(out / record["files"]["npy"])
    vessels = np.asarray(Image.open(VESSELS)).astype(np.int64)
    regions = rows_of(record, "region")
    check_regions(regions, attr, vessels)
    assert [row["name"] for row in regions] == ["0", "vessel"]
    channels = rows_of(record, "channel")
    assert [row["name"] for row in channels] == ["red", "green", "blue"]
    flat = attr.reshape(3, -1).astype(np.float64)
    for c, row in enumerate(channels):
        assert row["sum"] == pytest.approx(flat[c].sum(), rel=1e-6, abs=1e-9)
        assert row["share_abs"] == pytest.approx(np.abs(flat[c]).sum() / np.abs(flat).sum(), rel=1e-6)
    assert sum(row["share_abs"] for row in channels) == pytest.approx(1.0)
    assert sum(row["share_positive"] for row in channels) == pytest.approx(1.0)


def test_2d_prediction_is_the_threshold_wrappers_mask(tmp_path):
    out = tmp_path / "out"
    result = Pipeline(retina_config(out, {"labels": "prediction"}), base_dir=ROOT).run()
    assert result.exit_code == 0
    (record,) = result.runs
    from samples.models import VesselUNet2D

    model = VesselUNet2D()
    model.load_state_dict(torch.load(ROOT / "samples/checkpoints/vessel_unet2d.pt", weights_only=True))
    x = torch.from_numpy(np.asarray(Image.open(RETINA), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        mask = (torch.sigmoid(model.eval()(x))[0, 0] > 0.5).numpy().astype(np.int64)
    assert 0 < mask.sum() < mask.size
    check_regions(rows_of(record, "region"), np.load(out / record["files"]["npy"]), mask)


@pytest.mark.parametrize("summaries, field, words", [
    ({"labels": "wrong.npy"}, "output.summaries.labels", "is not the spatial shape [33, 41, 25]"),
    ({"labels": str(VESSELS)}, "output.summaries.labels", "a label map of 3D inputs has 3 axes"),
    ({"labels": str(ATLAS), "channels": ["T1", "T2"]}, "output.summaries.channels", "one name per channel"),
    ({"labels": str(DATA / "missing.nii.gz")}, "output.summaries.labels", "does not exist"),
    ({"labels": str(ATLAS), "names": {"one": "x"}}, "output.summaries.names.one", "not a label id"),
])
def test_bad_summaries_exit_2_naming_the_field(tmp_path, capsys, summaries, field, words):
    if summaries["labels"] == "wrong.npy":  # a 3D label map of another shape
        np.save(tmp_path / "wrong.npy", np.zeros((33, 41, 24), dtype=np.uint8))
        summaries = {"labels": str(tmp_path / "wrong.npy")}
    config = tissue_config(tmp_path / "out", summaries, [{"id": "captum.Saliency"}])
    config["model"] = {k: str(ROOT / v) for k, v in config["model"].items()}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code, _, err = run_cli(["run", path], capsys)
    assert code == 2
    assert field in err and words in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_python_function_on_explain_output():
    from samples.models import TissueUNet3D

    model = TissueUNet3D()
    model.load_state_dict(torch.load(ROOT / "samples/checkpoints/tissue_unet3d.pt", weights_only=True))
    x = torch.randn(1, 1, 16, 16, 16)
    attr = esegeta.explain(model, x, "captum.Saliency", 1, wrapper={"name": "multiclass", "activation": "softmax"},
                           abs=False)
    labels = np.zeros((16, 16, 16), dtype=np.int64)
    labels[4:12, 4:12, 4:12] = 3
    rows = esegeta.summaries(attr, torch.from_numpy(labels), names={3: "cube"})
    assert {row["index"] for row in rows} == {0}
    check_regions([r for r in rows if r["kind"] == "region"], attr[0].numpy(), labels)
    assert [r["name"] for r in rows if r["kind"] == "region"] == ["0", "cube"]
    assert rows_of({"summaries": {"rows": rows}}, "channel")[0]["share_abs"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="labels.*no resampling"):
        esegeta.summaries(attr, labels[:8])
    with pytest.raises(ConfigError, match="non-integer"):
        esegeta.summaries(attr, labels + 0.5)


def test_a_map_without_relevance_has_no_shares():
    rows = esegeta.summaries(np.zeros((1, 2, 4, 4)), np.eye(4, dtype=int))
    assert all(row["share_positive"] is None and row["share_abs"] is None and row["sum"] == 0 for row in rows)
    assert [row["voxels"] for row in rows if row["kind"] == "region"] == [12, 4]


def test_methods_of_one_input_share_one_predicted_label_map():
    from esegeta.attribution.summaries import Setting
    from esegeta.spec.request import from_arguments

    calls = []
    model = torch.nn.Conv2d(1, 3, 3, padding=1)
    model.register_forward_hook(lambda *_: calls.append(1))
    setting = Setting(None, True, {}, None, "prediction")
    x = torch.randn(1, 1, 8, 8)
    multiclass = from_arguments("captum.Saliency", wrapper={"name": "multiclass"})
    first = setting.labels(model, x, multiclass, "a")
    assert setting.labels(model, x, multiclass, "a") is first and len(calls) == 1
    with torch.no_grad():
        assert np.array_equal(first, model(x)[0].argmax(0).numpy())
    setting.labels(model, x, from_arguments("captum.Saliency", wrapper={"name": "multiclass"},
                                            patch={"size": [4, 4]}), "a")  # patches: another prediction
    setting.labels(model, x, multiclass, "b")
    assert len(calls) == 4  # "a" once, "a" in patches (its 4 patches in one call: patch.batch_size 4), "b"


def test_resumed_results_keep_their_totals(tmp_path):
    out = tmp_path / "out"
    config = retina_config(out, {"labels": str(VESSELS)})
    first = Pipeline(config, base_dir=ROOT).run()
    again = Pipeline(config, base_dir=ROOT, resume=True).run()
    assert [r.get("resumed") for r in again.runs] == [True]
    assert again.runs[0]["summaries"] == first.runs[0]["summaries"]
    assert len((out / "summaries.csv").read_text().splitlines()) == 1 + 2 + 3  # header, 2 regions, 3 channels


def test_label_files_read_in_the_models_axis_order(tmp_path):
    from esegeta.attribution.summaries import load_labels

    labels = np.random.default_rng(0).integers(0, 3, (5, 6, 7)).astype(np.uint8)  # (x, y, z): depth last
    nib.save(nib.Nifti1Image(labels[..., None], np.eye(4)), tmp_path / "labels.nii.gz")  # a trailing axis of 1
    np.save(tmp_path / "depth_first.npy", np.moveaxis(labels, -1, 0)[None])  # (1, D, H, W)
    assert np.array_equal(load_labels(tmp_path / "labels.nii.gz", None, 3), labels)
    assert np.array_equal(load_labels(tmp_path / "depth_first.npy", None, 3, depth_first=True), labels)
    with pytest.raises(ConfigError, match="output.summaries.labels.*2D inputs has 2 axes"):
        load_labels(tmp_path / "depth_first.npy", None, 2)
