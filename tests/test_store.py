"""Attribution datasets (esegeta.io.store): one Zarr store per method with an index, written by the
writer as results come in (any order), read lazily, kept by --resume once a chunk is written."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from esegeta.io import store as store_mod
from esegeta.io.loading import InputItem
from esegeta.run.runner import Pipeline
from esegeta.io.store import StoreWriter, open_store
from helpers_cli import DIGITS, valid_config

METHODS = [{"id": "captum.Saliency"}, {"id": "captum.IntegratedGradients", "label": "ig", "params": {"n_steps": 8}}]


def digits_run(tmp_path, out="out", formats=("npy", "zarr"), folder=DIGITS, resume=False, methods=METHODS):
    cfg = valid_config(tmp_path, methods, inputs={"paths": [str(folder)], "spatial_dims": 2},
                       runtime={"devices": "cpu", "batch_size": 3},
                       output={"dir": str(tmp_path / out), "formats": list(formats)})
    return Pipeline(cfg, resume=resume).run()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return digits_run(tmp_path_factory.mktemp("store"))


def test_one_store_per_method_with_its_index(run):
    assert run.exit_code == 0
    assert run.manifest["stores"] == {"captum.Saliency": "attributions/captum.Saliency.zarr",
                                      "ig": "attributions/ig.zarr"}
    names = [i["name"] for i in run.manifest["inputs"]]
    for label in ("captum.Saliency", "ig"):
        s = open_store(run.output_dir, label)
        assert isinstance(s.attributions, zarr.Array) and s.attributions.shape == (len(names), 1, 8, 8)
        assert s.inputs == names and s.labels == [None] * len(names) and s.written.all()
        assert s.paths == [i["path"] for i in run.manifest["inputs"]]
        by_input = {r["input"]: r for r in run.runs if r["label"] == label}
        for k, name in enumerate(names):
            np.testing.assert_array_equal(s.attributions[k], run.result(label, name))
            assert s.targets[k] == by_input[name]["target"]
            assert s.scores[k] == pytest.approx(by_input[name]["score"])
            assert by_input[name]["files"]["zarr"] == f"attributions/{label}.zarr"
        row = s[1]
        assert row["input"] == names[1] and row["target"] == s.targets[1]
        frame = s.index()
        assert list(frame.columns) == ["input", "label", "target", "score", "written"] and len(frame) == len(names)


def test_open_store_by_method_id_and_unknown_names(run):
    assert open_store(run.output_dir, "captum.IntegratedGradients").path.name == "ig.zarr"
    with pytest.raises(FileNotFoundError, match="stores: captum.Saliency, ig"):
        open_store(run.output_dir, "captum.DeepLift")


def test_no_store_without_the_zarr_format(tmp_path):
    result = digits_run(tmp_path, formats=("npy",), methods=METHODS[:1])
    assert "stores" not in result.manifest and not (result.output_dir / "attributions").exists()


def _items(n):
    return [InputItem(f"in{k}", None, None) for k in range(n)]


@pytest.mark.parametrize("buffer", [store_mod.BUFFER_BYTES, 300])
def test_rows_in_any_order_land_in_their_chunks(tmp_path, monkeypatch, buffer):
    """Chunks of 4 rows; rows arrive shuffled; some never come (failed): those rows stay unwritten."""
    monkeypatch.setattr(store_mod, "CHUNK_BYTES", 4 * 4 * 6)
    monkeypatch.setattr(store_mod, "BUFFER_BYTES", buffer)
    writer = StoreWriter(tmp_path, _items(10))
    rng = np.random.default_rng(0)
    rows = {k: rng.random((1, 2, 3), dtype=np.float32) for k in range(10) if k not in (5, 9)}
    records = {k: {"label": "m", "method": "x.M", "input": f"in{k}", "status": "ok", "score": float(k), "target": k % 3}
               for k in rows}
    for k in rng.permutation(list(rows)):
        assert writer.add(records[k], rows[k], "attribution")
    assert writer.add({**records[0], "input": "in3"}, np.zeros((2, 2)), "attribution") is False  # another shape
    writer.close(list(records.values()), {"x.M": "attribution"})
    s = open_store(tmp_path, "m")
    assert s.attributions.chunks == (4, 1, 2, 3)
    assert list(s.written) == [k not in (5, 9) for k in range(10)]
    for k, row in rows.items():
        np.testing.assert_array_equal(s.attributions[k], row)
    assert np.isnan(s.attributions[5]).all() and s[5]["attribution"] is None
    assert list(s.targets) == [k % 3 if k in rows else -1 for k in range(10)]


def test_a_failed_input_has_no_row(tmp_path):
    folder = tmp_path / "digits"
    shutil.copytree(DIGITS, folder)
    bad = np.load(folder / "digit_1_label0.npy")
    bad[0, 0] = np.nan
    np.save(folder / "digit_1_label0.npy", bad)
    result = digits_run(tmp_path, folder=folder, methods=METHODS[:1])
    s = open_store(result.output_dir, "captum.Saliency")
    failed = [i["name"] for i in result.manifest["inputs"]].index("digit_1_label0")
    assert result.exit_code == 1 and not s.written[failed] and s.written.sum() == len(s) - 1


@pytest.mark.parametrize("formats", [("npy", "zarr"), ("zarr",)])
def test_resume_keeps_every_journaled_result_whose_rows_a_kill_left_unwritten(tmp_path, formats):
    """Issue 26: with ["npy", "zarr"] a killed run kept 0 of its journaled results (their rows were
    still buffered); they are kept now, the rows read back from their .npy. Without .npy files the
    unwritten rows are gone, and only those results are recomputed."""
    first = digits_run(tmp_path, formats=formats)
    out = first.output_dir
    # a run killed before its store's chunk was written: the rows are not there
    group = zarr.open_group(str(out / "attributions" / "ig.zarr"), mode="r+")
    group["written"][:] = False
    (out / "manifest.json").write_text(json.dumps(first.manifest))
    again = digits_run(tmp_path, resume=True, formats=formats)
    kept = {(r["label"], r.get("resumed", False)) for r in again.runs}
    assert kept == ({("captum.Saliency", True), ("ig", True)} if "npy" in formats
                    else {("captum.Saliency", True), ("ig", False)})
    if "npy" not in formats:
        return
    for label in ("captum.Saliency", "ig"):
        s = open_store(out, label)
        assert s.written.all()
        for k, name in enumerate(s.inputs):
            np.testing.assert_array_equal(s.attributions[k], first.result(label, name))


def test_resume_builds_the_store_of_an_earlier_run_from_its_npy_files(tmp_path):
    first = digits_run(tmp_path, formats=("npy",))
    assert first.exit_code == 0 and not (first.output_dir / "attributions").exists()
    again = digits_run(tmp_path, resume=True)  # "zarr" added: nothing recomputed, the store read back
    assert again.exit_code == 0 and all(r.get("resumed") for r in again.runs)
    for label in ("captum.Saliency", "ig"):
        s = open_store(again.output_dir, label)
        assert s.written.all()
        by_input = {r["input"]: r for r in first.runs if r["label"] == label}
        for k, name in enumerate(s.inputs):
            np.testing.assert_array_equal(s.attributions[k], first.result(label, name))
            assert s.targets[k] == by_input[name]["target"]
