"""``runtime.backend: "ray"`` on a local Ray cluster (2 CPUs): the same records and numbers as the
local backend, --resume across backends, failures recorded as locally, a clear exit 2 without Ray."""
from __future__ import annotations

import json
import pickle
import os
import shutil
import sys

import numpy as np
import pytest

from esegeta.errors import ConfigError
from esegeta.run.runner import Pipeline
from esegeta.io.store import open_store
from helpers_cli import DIGITS, run_cli, valid_config, write_config

ray = pytest.importorskip("ray")

METHODS = [
    {"id": "captum.Saliency"},
    {"id": "captum.IntegratedGradients", "params": {"n_steps": 8}},
    {"id": "captum.ShapleyValueSampling", "params": {"feature_mask": {"grid": [2, 2]}, "n_samples": 4}},
    {"id": "captum.GradientShap", "params": {"n_samples": 4}},  # random: the job's seed decides
]
#: What may differ between two runs of the same jobs.
VOLATILE = ("seconds", "device", "resumed")


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The sample digits and one input holding a NaN (its results fail)."""
    folder = tmp_path_factory.mktemp("inputs")
    for path in DIGITS.iterdir():
        shutil.copy(path, folder)
    bad = np.load(DIGITS / "digit_1_label0.npy")
    bad[0, 2, 3] = np.nan
    np.save(folder / "nan_digit.npy", bad)
    return folder


def config(tmp_path, inputs, backend, out, methods=METHODS, batch_size=2):
    return valid_config(tmp_path, methods, inputs={"paths": [str(inputs)], "spatial_dims": 2},
                        runtime={"devices": "cpu", "seed": 3, "batch_size": batch_size, "backend": backend},
                        output={"dir": str(tmp_path / out), "formats": ["npy", "zarr"]})


def stable(record):
    return json.dumps({k: v for k, v in record.items() if k not in VOLATILE}, sort_keys=True)  # NaN == NaN


def test_ray_equals_local(cluster, tmp_path, inputs):
    local = Pipeline(config(tmp_path, inputs, "local", "local")).run()
    remote = Pipeline(config(tmp_path, inputs, "ray", "ray")).run()
    assert len(remote.runs) == len(local.runs) == 5 * len(METHODS)
    assert [stable(r) for r in remote.runs] == [stable(r) for r in local.runs]
    statuses = {(r["input"], r["status"]) for r in remote.runs}
    assert ("nan_digit", "failed") in statuses and ("digit_1_label0", "ok") in statuses
    for r in local.runs:
        if r["status"] == "ok":
            np.testing.assert_array_equal(remote.result(r["label"], r["input"]), local.result(r["label"], r["input"]))
    for m in METHODS:
        np.testing.assert_array_equal(open_store(remote.output_dir, m["id"]).attributions[:],
                                      open_store(local.output_dir, m["id"]).attributions[:])
    assert remote.manifest["config"]["runtime"]["backend"] == "ray"


def test_resume_across_backends(cluster, tmp_path, inputs):
    out = "resumed"
    first = Pipeline(config(tmp_path, inputs, "local", out, METHODS[:1])).run()
    second = Pipeline(config(tmp_path, inputs, "ray", out, METHODS[:2]), resume=True).run()
    ok_first = {r["input"] for r in first.runs if r["status"] == "ok"}
    for r in second.runs:
        assert r.get("resumed", False) == (r["method"] == "captum.Saliency" and r["input"] in ok_first), r
    third = Pipeline(config(tmp_path, inputs, "local", out, METHODS[:2]), resume=True).run()
    assert all(r.get("resumed") for r in third.runs if r["status"] == "ok")
    assert sum(r["status"] == "ok" for r in third.runs) == 8


def test_ray_without_ray_installed_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray gives: ImportError
    path = write_config(tmp_path, valid_config(tmp_path, runtime={"devices": "cpu", "backend": "ray"}))
    code, _, err = run_cli(["run", path], capsys)
    assert code == 2 and "runtime.backend" in err and "pip install 'esegeta[ray]'" in err, err
    assert "Traceback" not in err


def test_unknown_backend_names_the_field(tmp_path, capsys):
    path = write_config(tmp_path, valid_config(tmp_path, runtime={"devices": "cpu", "backend": "dask"}))
    code, _, err = run_cli(["validate", path], capsys)
    assert code == 2 and "runtime.backend" in err and "'local' or 'ray'" in err, err


def test_a_dataset_factory_on_ray(cluster, tmp_path):
    """Each actor builds the dataset itself; labels and numbers are those of the local backend."""
    from test_datasets import DATASET_PY

    (tmp_path / "digits_dataset.py").write_text(DATASET_PY)
    runs = {}
    for backend in ("local", "ray"):
        cfg = valid_config(tmp_path, METHODS[:2], inputs={"dataset": "digits_dataset.py:digits", "spatial_dims": 2},
                           runtime={"devices": "cpu", "batch_size": 4, "backend": backend},
                           output={"dir": str(tmp_path / backend), "formats": ["zarr"]})
        runs[backend] = Pipeline(cfg, base_dir=tmp_path).run()
    assert [stable(r) for r in runs["ray"].runs] == [stable(r) for r in runs["local"].runs]
    assert [r["input_label"] for r in runs["ray"].runs[::2]] == [0, 1, 2, 3, 4, 5]
    for m in METHODS[:2]:
        s = open_store(runs["ray"].output_dir, m["id"])
        assert s.labels == [0, 1, 2, 3, 4, 5]
        np.testing.assert_array_equal(s.attributions[:], open_store(runs["local"].output_dir, m["id"]).attributions[:])


def test_an_actor_keeps_only_its_current_jobs_inputs_in_the_cache(tmp_path):
    """An actor (here built and called as Ray's map_batches would, without a cluster) holds the inputs
    of the job it computes, not those of every job it has done."""
    from esegeta.run.backends.ray import Explainer

    cfg = config(tmp_path, DIGITS, "ray", "out", methods=METHODS[:2], batch_size=1)
    actor = Explainer(cfg, None, [0, 1], "cpu", 1)
    cache = actor.plan.inputs[0].source.cache
    n = len(actor.plan.inputs)
    assert n >= 3
    for k in range(n):
        for position in (0, 1):
            job = json.dumps({"position": position, "inputs": [k], "keys": ["x"], "labels": [None]})
            out = actor({"id": np.array([0]), "job": np.array([job], dtype=object)})
            assert out["payload"].shape == (1,)
            assert cache.held() == [k], (k, position, cache.held())


def test_files_named_in_params_reach_the_workers(tmp_path, monkeypatch):
    """PatternNet's ``fit_inputs`` (a folder, and one file) are shipped with the run's other files: an
    actor built from the shipped config, in another working directory, computes after the originals are
    gone; ``validate`` counts them against the shipping limit."""
    from esegeta.run.backends import ray as ray_backend

    fit = tmp_path / "fit"
    fit.mkdir()
    for path in sorted(DIGITS.iterdir())[:3]:
        shutil.copy(path, fit)
    one = tmp_path / "one_fit.npy"
    shutil.copy(sorted(DIGITS.iterdir())[0], one)
    methods = [{"id": "esegeta.PatternNet", "params": {"fit_inputs": str(fit)}},
               {"id": "esegeta.PatternAttribution", "params": {"fit_inputs": "one_fit.npy"}}]
    cfg = config(tmp_path, DIGITS, "ray", "out", methods=methods, batch_size=1)
    pipeline = Pipeline(cfg, base_dir=tmp_path)
    plan = pipeline.validate()
    shipped, env, folder = ray_backend.shipment(plan)
    try:
        params = [m["params"]["fit_inputs"] for m in shipped["methods"]]
        assert len(params[0]) == 3 and all((folder / p).is_file() for p in params[0])
        assert (folder / params[1]).is_file()
        shutil.rmtree(fit)
        one.unlink()
        monkeypatch.chdir(folder)  # Ray runs an actor in its shipped working directory
        actor = ray_backend.Explainer(shipped, ".", [0, 1], "cpu", 1)
        for position in (0, 1):
            job = json.dumps({"position": position, "inputs": [0], "keys": ["x"], "labels": [None]})
            status, computed = pickle.loads(actor({"id": np.array([0]), "job": np.array([job], dtype=object)})
                                            ["payload"][0])
            assert status == "done" and computed[0][0]["status"] == "ok", computed[0][0]
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    monkeypatch.setattr(ray_backend, "SHIP_LIMIT_BYTES", 1)  # validate refuses what run would
    monkeypatch.setattr(ray_backend, "check_address", lambda address, where="runtime.ray_address": None)
    cfg["runtime"]["ray_address"] = "127.0.0.1:1"
    with pytest.raises(ConfigError, match="runtime.ray_address"):
        Pipeline(cfg, base_dir=tmp_path).validate()
