"""Faults found by trying to break esegeta (issue 26), each reproduced: bad files, factories that
exit, unbounded globs and Ray addresses where no cluster answers get exit 2 naming the field, in
seconds, without a traceback."""
from __future__ import annotations

import os
import time

import pytest

from esegeta.io import loading
from helpers_cli import run_cli, valid_config, write_config


def _validate(tmp_path, capsys, cfg) -> tuple[int, str]:
    code, _, err = run_cli(["validate", write_config(tmp_path, cfg)], capsys)
    assert "Traceback" not in err
    return code, err


def test_a_factory_calling_sys_exit_is_refused_not_exit_0(tmp_path, capsys):
    (tmp_path / "exiting.py").write_text("import sys\n\ndef make():\n    sys.exit(0)\n")
    cfg = valid_config(tmp_path, model={"factory": f"{tmp_path / 'exiting.py'}:make"})
    code, err = _validate(tmp_path, capsys, cfg)
    assert code == 2 and "model.factory" in err and "SystemExit" in err
    (tmp_path / "exiting_import.py").write_text("import sys\nsys.exit(3)\n\ndef make():\n    pass\n")
    cfg = valid_config(tmp_path, model={"factory": f"{tmp_path / 'exiting_import.py'}:make"})
    code, _, err = run_cli(["run", write_config(tmp_path, cfg)], capsys)
    assert code == 2 and "model.factory" in err and not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("kind", ["device", "fifo", "folder"])
def test_weights_that_are_not_a_regular_file_are_refused_at_once(tmp_path, capsys, kind):
    """/dev/zero was read until memory ran out; a FIFO blocked for ever."""
    if kind == "device":
        weights = "/dev/zero"
        if not os.path.exists(weights):
            pytest.skip("no /dev/zero")
    elif kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        weights = str(tmp_path / "weights.pt")
        os.mkfifo(weights)
    else:
        weights = str(tmp_path)
    cfg = valid_config(tmp_path)
    cfg["model"]["weights"] = weights
    start = time.monotonic()
    code, err = _validate(tmp_path, capsys, cfg)
    assert code == 2 and "model.weights" in err and "not a regular file" in err
    assert time.monotonic() - start < 30
    cfg["model"] = {"weights": weights}  # TorchScript without a factory
    code, err = _validate(tmp_path, capsys, cfg)
    assert code == 2 and "model" in err


def test_a_recursive_glob_is_bounded_and_names_the_limit(tmp_path, capsys, monkeypatch):
    deep = tmp_path / "tree"
    folder = deep
    for n in range(loading.GLOB_MAX_DEPTH + 2):
        folder = folder / f"d{n}"
    folder.mkdir(parents=True)
    cfg = valid_config(tmp_path, inputs={"paths": [f"{deep}/**/*.npy"], "spatial_dims": 2})
    code, err = _validate(tmp_path, capsys, cfg)
    assert code == 2 and "inputs.paths[0]" in err and f"deeper than {loading.GLOB_MAX_DEPTH} folders" in err
    wide = tmp_path / "wide"
    wide.mkdir()
    for n in range(30):
        (wide / f"f{n}.txt").touch()
    monkeypatch.setattr(loading, "GLOB_MAX_ENTRIES", 20)
    cfg = valid_config(tmp_path, inputs={"paths": [f"{wide}/**/*.npy"], "spatial_dims": 2})
    code, err = _validate(tmp_path, capsys, cfg)
    assert code == 2 and "more than 20 entries" in err


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1", "auto", "not an address"])
def test_an_unreachable_ray_address_is_refused_in_seconds(tmp_path, capsys, monkeypatch, address):
    """host:port waited more than 5 minutes; ray:// and auto gave tracebacks (exit 1)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no cluster file there
    cfg = valid_config(tmp_path, runtime={"devices": "cpu", "backend": "ray", "ray_address": address})
    start = time.monotonic()
    for command in ("validate", "run"):
        code, _, err = run_cli([command, write_config(tmp_path, cfg)], capsys)
        assert code == 2 and "runtime.ray_address" in err and "Traceback" not in err, err
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_check_json_stays_parseable_when_the_model_file_prints(tmp_path):
    """The model file's print() came on stdout before the JSON."""
    import json
    import subprocess
    import sys

    from helpers_cli import FACTORY, REPO

    module, name = FACTORY.rsplit(":", 1)
    (tmp_path / "noisy.py").write_text(f"import os, sys\nsys.path.insert(0, {str(REPO / 'samples')!r})\n"
                                       "from models import DigitResNet\nprint('hello from the model file')\n"
                                       "os.write(1, b'and from file descriptor 1\\n')\n\n"
                                       "def make():\n    print('hello from the factory')\n    return DigitResNet()\n")
    cfg = valid_config(tmp_path, model={"factory": f"{tmp_path / 'noisy.py'}:make"})
    config = write_config(tmp_path, cfg)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "esegeta", "check", str(config), "--json"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    json.loads(done.stdout)  # nothing but the JSON
    assert "hello from the model file" in done.stderr and "and from file descriptor 1" in done.stderr


def test_batch_size_never_changes_a_shap_style_result(tmp_path):
    """DeepLiftShap's default "blur" baselines were built from every input of a batch (a median
    change of 12.5 % between batch 1 and 8); GradientShap's batch failed with one NaN input."""
    import numpy as np

    from esegeta.run.runner import Pipeline
    from helpers_cli import DIGITS

    folder = tmp_path / "digits"
    folder.mkdir()
    for n, path in enumerate(sorted(DIGITS.glob("*.npy"))):
        x = np.load(path)
        np.save(folder / path.name, x)
        if n == 0:
            bad = x.copy()
            bad.flat[0] = np.nan
            np.save(folder / "nan.npy", bad)
    methods = [{"id": "captum.DeepLiftShap"}, {"id": "captum.GradientShap", "params": {"n_samples": 4}},
               {"id": "captum.Saliency", "label": "tunnel", "noise_tunnel": {"nt_samples": 2, "stdevs": 0.1}}]

    def run(batch):
        cfg = valid_config(tmp_path, methods, inputs={"paths": [str(folder)], "spatial_dims": 2},
                           runtime={"devices": "cpu", "batch_size": batch, "seed": 0},
                           output={"dir": str(tmp_path / f"out{batch}"), "formats": ["npy"]})
        return Pipeline(cfg).run()

    single, batched = run(1), run(8)
    status = {(r["label"], r["input"]): r["status"] for r in single.runs}
    assert {(r["label"], r["input"]): r["status"] for r in batched.runs} == status
    assert [k for k, v in status.items() if v != "ok"] == [(m, "nan") for m in ("captum.DeepLiftShap",
                                                                                  "captum.GradientShap", "tunnel")]
    for r in single.runs:
        if r["status"] == "ok":
            np.testing.assert_allclose(batched.result(r["label"], r["input"]), single.result(r["label"], r["input"]),
                                       rtol=1e-5, atol=1e-6)


def test_a_full_disk_exits_1_without_traceback_nor_logging_errors(tmp_path):
    """The output folder on a small tmpfs (where the machine lets us mount one): a full disk gave a
    traceback (the journal's close) and a '--- Logging error ---' block per message."""
    import subprocess
    import sys

    from helpers_cli import DIGITS, REPO

    disk, folder = tmp_path / "disk", tmp_path / "digits"
    disk.mkdir()
    folder.mkdir()
    for n in range(6):
        for path in DIGITS.glob("*.npy"):
            (folder / f"{path.stem}_{n}.npy").write_bytes(path.read_bytes())
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        cfg = valid_config(tmp_path, [{"id": "captum.Saliency"}, {"id": "captum.InputXGradient"}],
                           inputs={"paths": [str(folder)], "spatial_dims": 2},
                           output={"dir": str(disk / "out"), "formats": ["npy", "png"]},
                           evaluation={"metrics": ["sparseness"]})
        env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
        done = subprocess.run([sys.executable, "-m", "esegeta", "run", str(write_config(tmp_path, cfg))],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, done.stderr[-3000:]
        assert "Traceback" not in done.stderr and "Logging error" not in done.stderr, done.stderr[-3000:]
        assert "No space left on device" in done.stderr
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_inputs_named_like_the_runs_own_files_do_not_block_them(tmp_path, capsys):
    """Inputs evaluation.csv.npy and explorer.html.npy became folders where the evaluation's table
    and the explorer page go (IsADirectoryError from esegeta evaluate)."""
    from helpers_cli import ONE_DIGIT

    folder = tmp_path / "hostile"
    folder.mkdir()
    for name in ("evaluation.csv", "explorer.html", "evaluation_ranking.csv"):
        (folder / f"{name}.npy").write_bytes(ONE_DIGIT.read_bytes())
    cfg = valid_config(tmp_path, inputs={"paths": [str(folder)], "spatial_dims": 2})
    code, _, err = run_cli(["run", write_config(tmp_path, cfg)], capsys)
    assert code == 0, err
    out = tmp_path / "out"
    for name in ("evaluation.csv", "explorer.html", "evaluation_ranking.csv"):
        assert not (out / name).exists() and (out / f"{name}_").is_dir()


DATASETS = '''
import torch


class Raises(torch.utils.data.Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, k):
        raise ValueError("broken item")


class Negative(Raises):
    def __len__(self):
        return -1


class Strings(Raises):
    def __getitem__(self, k):
        return "hello"
'''


@pytest.mark.parametrize("name, message", [("Raises", "reading {ds}[0] failed: ValueError: broken item"),
                                           ("Negative", "__len__() should return >= 0"),
                                           ("Strings", "[0]'s input is a str")])
def test_a_dataset_that_breaks_is_refused_naming_it(tmp_path, capsys, name, message):
    (tmp_path / "data.py").write_text(DATASETS)
    ds = f"{tmp_path / 'data.py'}:{name}"
    cfg = valid_config(tmp_path, inputs={"dataset": ds, "spatial_dims": 2})
    code, err = _validate(tmp_path, capsys, cfg)
    assert code == 2 and "inputs.dataset" in err and message.format(ds=ds) in err, err


def test_a_torchscript_model_with_a_layer_method_is_refused_naming_the_layer(tmp_path, capsys):
    import sys

    import torch

    from helpers_cli import SAMPLES

    sys.path.insert(0, str(SAMPLES))
    try:
        from models import DigitResNet
    finally:
        sys.path.remove(str(SAMPLES))
    torch.jit.script(DigitResNet().eval()).save(str(tmp_path / "scripted.pt"))
    cfg = valid_config(tmp_path, [{"id": "captum.LayerGradCam", "layer": "layer2"}],
                       model={"weights": str(tmp_path / "scripted.pt")})
    for command in ("validate", "run"):
        code, _, err = run_cli([command, write_config(tmp_path, cfg)], capsys)
        assert code == 2 and "methods[0].layer" in err and "TorchScript" in err and "Traceback" not in err, err


def test_the_converter_keeps_results_beside_the_config_and_notes_what_it_does_not_use(tmp_path):
    """The ancestor's absolute output_path was written as is (a run made a folder at the file-system
    root); with --output-dir, output_path, model_name, dataset and test_run were dropped without a note."""
    from esegeta.cli import torchesegeta as te
    from helpers_cli import DIGITS, FACTORY, WEIGHTS

    source = {"model_nature": "classification", "model_name": "net", "is_3d": False, "dataset": "digits",
              "test_run": "t1", "output_path": "/abs/where", "methods": [
                  {"method_name": "captum_Saliency", "use": True, "keywords": {}},
                  {"method_name": "torchray_Rise", "use": True, "keywords": {}}]}

    def convert(output_dir):
        return te.convert(source, te.Arguments(inputs=[str(DIGITS)], model_factory=FACTORY, weights=str(WEIGHTS),
                                               output_dir=output_dir, config_dir=tmp_path), check_layers=False)

    plain = convert(None)
    assert plain.config["output"]["dir"] == "results/net_digits_t1"
    assert any(n.where == "output_path" and "absolute" in n.reason for n in plain.notes)
    assert [m["id"] for m in plain.config["methods"]] == ["captum.Saliency", "torchray.rise"]
    given = convert(str(tmp_path / "out"))
    assert given.config["output"]["dir"] == "out"
    assert {n.where for n in given.notes} >= {"output_path", "model_name", "dataset", "test_run"}


HELD = '''
import os
import threading
import time

from torch import nn


class Held(nn.Module):
    """In a run's job thread, its forward pass waits until the file GATE exists: the run stays open
    while a test acts (validate's forward pass, in the main thread, goes through)."""

    def __init__(self, gate):
        super().__init__()
        self.gate = gate
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        deadline = time.monotonic() + 120
        while (threading.current_thread().name.startswith("esegeta-job") and not os.path.exists(self.gate)
               and time.monotonic() < deadline):
            time.sleep(0.05)
        return self.fc(x.flatten(1))
'''


def test_the_folder_lock_refuses_a_second_run_while_the_first_is_held_open(tmp_path, capsys):
    """The first run is held in its first forward pass until the test lets it go, so the second
    run meets it still writing (the first had finished first on a loaded machine)."""
    import subprocess
    import sys

    from helpers_cli import REPO

    (tmp_path / "held.py").write_text(HELD)
    gate = tmp_path / "gate"
    cfg = valid_config(tmp_path, model={"factory": f"{tmp_path / 'held.py'}:Held", "kwargs": {"gate": str(gate)}},
                       target=0)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "esegeta", "run", str(write_config(tmp_path, cfg))], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "esegeta.log").is_file():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.02)
        code, _, err = run_cli(["run", write_config(tmp_path, cfg, "second.json")], capsys)
        assert code == 2 and f"is in use by another esegeta run (pid {first.pid})" in err and "Traceback" not in err
        assert first.poll() is None, "the first run ended while the second was refused"
        gate.touch()
        _, first_err = first.communicate(timeout=120)
    finally:
        gate.touch()
        first.kill()
        first.wait()
    assert first.returncode == 0, first_err[-2000:]


@pytest.mark.parametrize("key, value, message", [
    ("output", {"a": 1}, "wrapper.output: Input should be a valid string"),
    ("threshold", [1], "wrapper.threshold: Input should be a valid number"),
])
def test_error_paths_name_keys_that_exist_not_union_tags(tmp_path, capsys, key, value, message):
    """wrapper.output.int, wrapper.output.str, wrapper.threshold.float were named (pydantic's tags)."""
    cfg = valid_config(tmp_path, wrapper={"name": "threshold", "threshold": 0.5, key: value})
    code, err = _validate(tmp_path, capsys, cfg)
    assert code == 2 and message in err
    assert f"wrapper.{key}." not in err


@pytest.mark.parametrize("grid, message", [([2, 2, 2], "give 2 block sizes"), ([100, 4], "larger than the input")])
def test_a_feature_mask_grid_that_does_not_fit_the_input_is_refused(tmp_path, capsys, grid, message):
    cfg = valid_config(tmp_path, [{"id": "captum.FeatureAblation", "params": {"feature_mask": {"grid": grid}}}])
    code, err = _validate(tmp_path, capsys, cfg)
    assert code == 2 and "methods[0].params.feature_mask.grid" in err and message in err, err
    ok = valid_config(tmp_path, [{"id": "captum.FeatureAblation", "params": {"feature_mask": {"grid": [2, 2]}}}])
    assert _validate(tmp_path, capsys, ok)[0] == 0


def test_a_disabled_entry_may_lack_its_layer(tmp_path, capsys):
    """The converter disables an entry whose ancestor named no layer; validating the written config
    then failed (exit 2) on that disabled entry. An enabled one is still refused."""
    methods = [{"id": "captum.Saliency"}, {"id": "captum.LayerGradCam", "enabled": False}]
    code, err = _validate(tmp_path, capsys, valid_config(tmp_path, methods))
    assert code == 0, err
    methods[1]["enabled"] = True
    code, err = _validate(tmp_path, capsys, valid_config(tmp_path, methods))
    assert code == 2 and "methods[1].layer" in err
