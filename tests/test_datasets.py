"""Inputs as a stream (esegeta.io.datasets): folders of many files and dataset factories, listed up
front and loaded per job; labels reach the manifest; batches of one shape share an upstream call."""
from __future__ import annotations

import gc
import json
import textwrap

import numpy as np
import pytest
import torch

from esegeta.io import datasets
from esegeta.run import plan as planning
from esegeta.spec import config as config_mod
from esegeta.errors import ConfigError
from esegeta.io import loading
from esegeta.io.loading import InputItem
from esegeta.run.runner import Pipeline
from helpers_cli import DIGITS, WEIGHTS, run_cli, valid_config, write_config

DATASET_PY = textwrap.dedent('''
    import numpy as np
    import torch
    from torch.utils.data import Dataset

    class Digits(Dataset):
        """The first ``n`` scikit-learn digits as (1, 8, 8) tensors in [0, 1], with their labels."""

        def __init__(self, n=6, style="pair"):
            from sklearn.datasets import load_digits

            data = load_digits()
            self.x = (data.images[:n] / 16.0).astype(np.float32)
            self.y = data.target[:n]
            self.style = style

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            x = torch.from_numpy(self.x[i])[None]
            if self.style == "dict":
                return {"input": x, "label": torch.tensor(self.y[i])}
            if self.style == "bare":
                return self.x[i]
            return x, int(self.y[i])

    def digits(n=6, style="pair"):
        return Digits(n, style)

    def not_a_dataset():
        return 42

    def empty():
        return []
''')


@pytest.fixture
def dataset_file(tmp_path):
    path = tmp_path / "digits_dataset.py"
    path.write_text(DATASET_PY)
    return path


def dataset_config(tmp_path, dataset_file, n=6, style="pair", methods=None, **runtime):
    return valid_config(tmp_path, methods or [{"id": "captum.Saliency"}],
                        inputs={"dataset": f"{dataset_file}:digits", "dataset_kwargs": {"n": n, "style": style},
                                "spatial_dims": 2},
                        output={"dir": str(tmp_path / "out"), "formats": ["npy", "zarr"]},
                        runtime={"devices": "cpu", "seed": 0, **runtime})


def test_a_dataset_factory_runs_with_labels_in_the_manifest(tmp_path, dataset_file):
    from sklearn.datasets import load_digits

    result = Pipeline(dataset_config(tmp_path, dataset_file, batch_size=4)).run()
    assert result.exit_code == 0
    labels = list(load_digits().target[:6])
    assert [i["name"] for i in result.manifest["inputs"]] == [f"item-{k:05d}" for k in range(6)]
    assert [i["label"] for i in result.manifest["inputs"]] == labels
    assert [r["input_label"] for r in result.runs] == labels
    assert result.manifest["inputs"][0]["shape"] == [1, 8, 8]
    # the numbers equal those of the same digit given as a file through the same model
    x = torch.from_numpy((load_digits().images[2] / 16.0).astype(np.float32))[None, None].requires_grad_(True)
    from samples.models import DigitResNet

    model = DigitResNet()
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    model.eval()
    out = model(x)
    out[0, out.argmax()].backward()
    np.testing.assert_allclose(result.result("captum.Saliency", "item-00002"), x.grad.abs()[0].numpy(), rtol=1e-5,
                               atol=1e-7)
    assert result.runs[2]["target"] == int(out.argmax())


@pytest.mark.parametrize("style", ["dict", "bare"])
def test_dataset_items_as_mappings_or_bare_arrays(tmp_path, dataset_file, style):
    result = Pipeline(dataset_config(tmp_path, dataset_file, n=2, style=style)).run()
    assert result.exit_code == 0
    expected = [0, 1] if style == "dict" else [None, None]
    assert [i.get("label") for i in result.manifest["inputs"]] == expected
    assert all(("input_label" in r) == (style == "dict") for r in result.runs)


def test_split_item_and_plain_label():
    x = torch.zeros(1, 4, 4)
    assert datasets.split_item((x, 3), "d[0]")[1] == 3
    assert datasets.split_item({"image": x, "target": 2}, "d[0]")[1] == 2
    assert datasets.split_item(x, "d[0]") == (x, None)
    with pytest.raises(ConfigError, match="without an 'input'"):
        datasets.split_item({"pixels": x}, "d[0]")
    assert datasets.plain_label(torch.tensor(5)) == 5 and datasets.plain_label(np.int64(7)) == 7
    assert datasets.plain_label(np.array([1, 2])) == [1, 2] and datasets.plain_label("cat") == "cat"


@pytest.mark.parametrize("inputs, field, message", [
    ({"paths": ["x.npy"], "dataset": "d.py:f", "spatial_dims": 2}, "inputs.paths", "not both"),
    ({"spatial_dims": 2}, "inputs.paths", "or give 'dataset'"),
])
def test_paths_or_dataset_exactly_one(tmp_path, capsys, inputs, field, message):
    path = write_config(tmp_path, valid_config(tmp_path, inputs=inputs))
    code, _, err = run_cli(["validate", path], capsys)
    assert code == 2 and field in err and message in err, err


def test_the_typed_inputs_section_is_read_as_it_is(tmp_path):
    """The plan hands the validated ``inputs`` section on (not a dump re-defaulted with ``.get``):
    the source holds that very object, and reads its settings and InputsConfig's defaults."""
    cfg = config_mod.parse(valid_config(tmp_path, inputs={"paths": [str(DIGITS)], "spatial_dims": 2}))
    assert planning.plan(cfg, tmp_path).inputs[0].source.cfg is cfg.inputs
    cfg = config_mod.parse(valid_config(tmp_path, inputs={"paths": [str(DIGITS)], "spatial_dims": 2, "color": "rgb",
                                                          "normalize": {"mean": 0.5, "std": 0.25}}))
    src = datasets.source(cfg.inputs, tmp_path)
    assert src.cfg is cfg.inputs
    item = src.load(0)
    raw = torch.as_tensor(np.load(item.path), dtype=torch.float32)
    assert item.tensor.shape == (1, 3, 8, 8) and not item.channels_last and not item.depth_first
    torch.testing.assert_close(item.tensor[0, 2], (raw.reshape(8, 8) - 0.5) / 0.25)


@pytest.mark.parametrize("inputs, field, message", [
    ({"paths": ["x.npy"], "spatial_dims": 2, "colour": "rgb"}, "inputs.colour", "did you mean color"),
    ({"paths": ["x.npy"], "spatial_dims": 2, "resize": [8]}, "inputs.resize", "needs 2 sizes"),
    ({"paths": ["x.npy"], "spatial_dims": "2"}, "inputs.spatial_dims", "Input should be 2 or 3"),
    (["x.npy"], "inputs", "not list"),
])
def test_a_dict_from_python_is_validated_once_at_the_boundary(inputs, field, message):
    """Python callers may pass the section as a dict: it is validated as ``InputsConfig`` once, with
    the JSON path of each fault, before a file is read."""
    for load in (datasets.source, loading.load_inputs):
        with pytest.raises(ConfigError) as caught:
            load(inputs, None)
        assert caught.value.path == field and message in caught.value.message, caught.value
    with pytest.raises(ConfigError, match="model.weight: unknown key; did you mean weights"):
        loading.load_model({"factory": "m.py:f", "weight": "w.pt"}, None)


@pytest.mark.parametrize("factory, message", [
    ("not_a_dataset", "returned int, not a map-style torch Dataset"),
    ("empty", "returned an empty dataset"),
    ("missing", "has no 'missing'"),
])
def test_bad_dataset_factories_name_the_field(tmp_path, capsys, dataset_file, factory, message):
    cfg = valid_config(tmp_path, inputs={"dataset": f"{dataset_file}:{factory}", "spatial_dims": 2})
    code, _, err = run_cli(["validate", write_config(tmp_path, cfg)], capsys)
    assert code == 2 and "inputs.dataset" in err and message in err, err


def test_a_folder_of_many_files_is_listed_not_loaded(tmp_path, monkeypatch):
    """A plan over 300 files holds at most the cache's few inputs, never all of them."""
    from sklearn.datasets import load_digits

    folder = tmp_path / "many"
    folder.mkdir()
    for k, image in enumerate(load_digits().images[:300]):
        np.save(folder / f"d{k:03d}.npy", (image / 16.0).astype(np.float32))
    one = 8 * 8 * 4
    monkeypatch.setattr(datasets, "CACHE_BYTES", 5 * one)
    cfg = config_mod.parse(valid_config(tmp_path, inputs={"paths": [str(folder)], "spatial_dims": 2}))

    def items_alive() -> int:
        gc.collect()
        return sum(type(o) is InputItem for o in gc.get_objects())

    before = items_alive()
    plan = planning.plan(cfg, tmp_path)
    alive = items_alive() - before
    assert len(plan.inputs) == 300 and alive <= 5, alive
    assert all(ref.shape == (1, 1, 8, 8) and ref.digest for ref in plan.inputs)
    assert plan.inputs[299].name == "d299"
    # jobs of batch_size inputs of one shape, each holding references only
    cfg = config_mod.parse(valid_config(tmp_path, inputs={"paths": [str(folder)], "spatial_dims": 2},
                                        runtime={"devices": "cpu", "batch_size": 64}))
    plan = planning.plan(cfg, tmp_path)
    _, jobs = planning.jobs(plan, {})
    assert [len(j.items) for j in jobs] == [64, 64, 64, 64, 44]


def test_batches_group_inputs_by_shape(tmp_path):
    """Inputs of two shapes: each batch holds one shape; results equal one-at-a-time."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(5):
        size = 8 if k % 2 == 0 else 12
        np.save(folder / f"m{k}.npy", rng.random((size, size), dtype=np.float32))
    methods = [{"id": "captum.Saliency"}, {"id": "captum.IntegratedGradients", "params": {"n_steps": 8}}]

    def run(batch):
        cfg = valid_config(tmp_path, methods, inputs={"paths": [str(folder)], "spatial_dims": 2},
                           runtime={"devices": "cpu", "batch_size": batch},
                           output={"dir": str(tmp_path / f"out{batch}"), "formats": ["npy"]})
        return Pipeline(cfg).run()

    single, batched = run(1), run(4)
    assert single.exit_code == batched.exit_code == 0
    assert sorted(r.get("batch", 1) for r in batched.runs) == [2, 2, 2, 2, 3, 3, 3, 3, 3, 3]
    for r in single.runs:
        np.testing.assert_allclose(batched.result(r["label"], r["input"]), single.result(r["label"], r["input"]),
                                   rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "out4" / "manifest.json").read_text())["inputs"][1]["shape"] == [1, 12, 12]


def test_the_cache_is_bounded_in_bytes():
    loads = []

    def load(k):
        loads.append(k)
        return InputItem(str(k), None, torch.zeros(1, 1, 4, 4))

    cache = datasets._Cache(budget=3 * 64)
    for k in [0, 1, 2, 0, 3, 0, 1]:
        cache.get(k, load)
    assert loads == [0, 1, 2, 3, 1]  # 0 kept (recently used), 1 dropped for 3
    assert sum(1 for _ in cache._items) == 3


def test_the_cache_holds_only_inputs_whose_jobs_are_still_to_come(tmp_path):
    """Issue 26: the scan of every input filled the cache (up to 256 MiB) before the first job and
    the inputs stayed after their jobs had ended, so a run's memory grew with its inputs."""
    from esegeta.run.memory import Releaser

    cfg = valid_config(tmp_path, [{"id": "captum.Saliency"}, {"id": "captum.InputXGradient"}],
                       inputs={"paths": [str(DIGITS)], "spatial_dims": 2})
    plan = Pipeline(cfg).validate()
    cache = plan.inputs[0].source.cache
    assert set(cache._items) <= {0}  # the scan kept nothing (the plan's forward pass read the first)
    from esegeta.run import job as job_mod
    from esegeta.run.executor import Worker

    _, jobs = planning.jobs(plan, {})
    every = [(j.position, [k for k, _ in j.items]) for j in jobs]
    releaser, worker = Releaser(), Worker(plan.devices[0], plan.model, plan.inputs, plan.ready)
    for n, job in enumerate(releaser.watch(jobs)):  # made as they are taken
        assert (job.position, [k for k, _ in job.items]) == every[n]
        assert [r["status"] for r, _, _ in job_mod.compute(plan, job, worker)] == ["ok"] * len(job.items)
        assert worker._samples is None  # Captum reads no samples: the run's inputs are not gathered for it
        releaser.done(job)
        done = {k for _, ks in every[:n + 1] for k in ks}
        pending = {k for _, ks in every[n:] for k in ks}  # the job just ended is the mark: its inputs wait for it
        assert set(cache._items) == done & pending
    assert not cache._items and cache._bytes == 0


def test_factory_reference_in_a_config_file(tmp_path, dataset_file, capsys):
    cfg = dataset_config(tmp_path, dataset_file, n=3)
    cfg["inputs"]["dataset"] = "digits_dataset.py:digits"  # relative to the config's folder
    code, out, err = run_cli(["validate", write_config(tmp_path, cfg)], capsys)
    assert code == 0 and "3 input(s)" in out, err
