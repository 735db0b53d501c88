"""The runner's guarantees, each proved by injecting the fault it guards against (issue 9).

Real runs on the sample digits throughout; the faults are injected into the operating system's
side only: ``os.replace``/``os.fsync`` failing once (monkeypatched for one call), a file-size
limit (``RLIMIT_FSIZE``) on a real subprocess, ``kill -9`` of a real subprocess, a second real
run on the same folder. Nothing of torch or of the explainer libraries is mocked.
"""
from __future__ import annotations

import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from esegeta.spec import registry
from esegeta.errors import ConfigError
from esegeta.run.runner import Pipeline
from helpers_cli import DIGITS, REPO, run_cli, write_config
from test_resume import slow_config
from test_runtime import digits_config

ALL_DIGITS = sorted(DIGITS.glob("*.npy"))
JOURNAL = ".esegeta-journal.jsonl"


def _journal(out: Path) -> list[dict]:
    path = out / JOURNAL
    lines = path.read_text().splitlines() if path.is_file() else []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r for r in records if "label" in r]


def _start(cfg: dict, tmp_path: Path, *extra: str, name: str = "config.json", **kw) -> subprocess.Popen:
    config = write_config(tmp_path, cfg, name)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "esegeta", "run", str(config), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(predicate, process: subprocess.Popen, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert process.poll() is None, f"the run ended early: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


# -- a failing write never kills a worker ------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2])
def test_failing_result_write_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, threads):
    cfg = digits_config(tmp_path, [{"id": "captum.Saliency"}], threads_per_device=threads)
    hit = ALL_DIGITS[1].stem
    real_replace, real_fsync, failed = os.replace, os.fsync, []

    def replace_failing_once(src, dst, *args, **kwargs):
        if Path(dst).parent.name == hit and "replace" not in failed:
            failed.append("replace")
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real_replace(src, dst, *args, **kwargs)

    def fsync_failing_once_on_the_journal(fd):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        last = Path(target).read_text().splitlines()[-1] if target.endswith(JOURNAL) else ""
        if ALL_DIGITS[2].stem in last and "fsync" not in failed:  # the record of another input
            failed.append("fsync")
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace_failing_once)
    monkeypatch.setattr(os, "fsync", fsync_failing_once_on_the_journal)
    result = Pipeline(cfg).run()
    assert len(result.runs) == 4 and result.exit_code == 1
    status = {r["input"]: r for r in result.runs}
    assert status[hit]["status"] == "failed" and "No space left on device" in status[hit]["error"]
    assert "writing results" in status[hit]["error"] and status[hit]["files"] == {}
    journal_hit = [r for r in result.runs if r["status"] == "failed" and r["input"] != hit]
    if sys.platform.startswith("linux"):
        assert failed == ["replace", "fsync"] or failed == ["fsync", "replace"]
        assert len(journal_hit) == 1 and "No space left on device" in journal_hit[0]["error"]
    assert sum(r["status"] == "ok" for r in result.runs) == 4 - 1 - len(journal_hit)
    assert json.loads((result.output_dir / "manifest.json").read_text())["runs"] == json.loads(
        json.dumps(list(result.runs)))


def test_failing_manifest_write_exits_1_and_loses_no_result(tmp_path, monkeypatch):
    cfg = digits_config(tmp_path, [{"id": "captum.Saliency"}])
    real_replace, calls = os.replace, []

    def replace_failing_once(src, dst, *args, **kwargs):
        if Path(dst).name == "manifest.json" and not calls:
            calls.append(dst)
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace_failing_once)
    result = Pipeline(cfg).run()
    assert calls and result.exit_code == 1
    assert len(result.runs) == 4 and all(r["status"] == "ok" for r in result.runs)
    monkeypatch.undo()
    again = Pipeline(cfg, resume=True).run()  # the journal kept every result
    assert again.exit_code == 0 and all(r.get("resumed") for r in again.runs) and len(again.runs) == 4


def test_full_disk_in_a_real_process_exits_1_without_traceback(tmp_path):
    """RLIMIT_FSIZE: every write past 3 kB fails with EFBIG (Python ignores SIGXFSZ): the figures
    and the manifest do not fit, the .npy files and the journal lines do."""
    cfg = digits_config(tmp_path, [{"id": "captum.Saliency"}, {"id": "captum.InputXGradient"}],
                        inputs=ALL_DIGITS[:1])
    cfg["output"]["formats"] = ["npy", "png"]
    out = Path(cfg["output"]["dir"])

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    process = _start(cfg, tmp_path, preexec_fn=limit)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "File too large" in err
    recorded = {(r["label"], r["input"]) for r in _journal(out)}
    if (out / "manifest.json").is_file():
        recorded |= {(r["label"], r["input"]) for r in json.loads((out / "manifest.json").read_text())["runs"]}
    assert recorded == {(m, ALL_DIGITS[0].stem) for m in ("captum.Saliency", "captum.InputXGradient")}


# -- done = files and record durable -----------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_resume_after_kill_9_at_a_random_moment_recomputes_nothing_finished(tmp_path, seed):
    cfg = slow_config(tmp_path)
    cfg["runtime"]["threads_per_device"] = 2
    out = Path(cfg["output"]["dir"])
    log = out / "esegeta.log"
    process = _start(cfg, tmp_path)
    try:
        _wait_for(lambda: log.is_file() and " on " in log.read_text(), process)
        time.sleep(random.Random(seed).uniform(0.0, 2.0))
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        finished = {tuple(line.split(": ok in")[0].split(" ", 3)[-1].split(" on ")) for line in
                    log.read_text().splitlines() if ": ok in" in line}
    finally:
        process.kill()
        process.wait()
    stamps = {}
    for r in _journal(out):
        if (r["label"], r["input"]) in finished:
            stamps.update({f: (out / f).stat().st_mtime_ns for f in r["files"].values()})
    assert len(stamps) == len(finished)  # every result logged ok has its journal line and its file

    result = Pipeline(cfg, resume=True).run()
    assert result.exit_code == 0 and len(result.runs) == 8
    for r in result.runs:
        assert bool(r.get("resumed")) == ((r["label"], r["input"]) in finished)
    assert {f: (out / f).stat().st_mtime_ns for f in stamps} == stamps
    assert not list(out.rglob(".tmp-*"))


# -- temp files of live runs are kept --------------------------------------------------------
def test_resume_removes_only_temporary_files_of_runs_no_longer_alive(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    other = slow_config(inner)
    other["output"]["dir"] = str(tmp_path / "out" / "inner")
    process = _start(other, inner)
    try:
        log = tmp_path / "out" / "inner" / "esegeta.log"
        _wait_for(lambda: log.is_file() and " on " in log.read_text(), process)
        digit = tmp_path / "out" / "inner" / ALL_DIGITS[0].stem
        digit.mkdir(parents=True, exist_ok=True)
        live = digit / f".tmp-{process.pid}-cafebabe-0000-y.npy"
        live.write_bytes(b"being written")
        dead = tmp_path / "out" / ".tmp-999999-deadbeef-x.npy"
        dead.parent.mkdir(parents=True, exist_ok=True)
        dead.write_bytes(b"half")
        mine = tmp_path / "out" / f".tmp-{os.getpid()}-feedbeef-x.npy"  # our pid, no live run's token
        mine.write_bytes(b"half")
        cfg = digits_config(tmp_path, [{"id": "captum.Saliency"}], inputs=ALL_DIGITS[:1])
        assert Pipeline(cfg, resume=True).run().exit_code == 0
        assert live.exists() and not dead.exists() and not mine.exists()
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, err[-2000:]
    assert all(r["status"] == "ok" for r in json.loads((tmp_path / "out/inner/manifest.json").read_text())["runs"])


# -- a busy output folder is refused ---------------------------------------------------------
def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path, capsys):
    cfg = slow_config(tmp_path)
    out = Path(cfg["output"]["dir"])
    process = _start(cfg, tmp_path)
    try:
        _wait_for(lambda: (out / "esegeta.log").is_file(), process)
        code, _, err = run_cli(["run", write_config(tmp_path, cfg, "second.json")], capsys)
        assert code == 2, err
        assert "output.dir" in err and f"is in use by another esegeta run (pid {process.pid})" in err
        assert "Traceback" not in err
        _, first_err = process.communicate(timeout=300)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, first_err[-2000:]
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert len(runs) == 8 and all(r["status"] == "ok" for r in runs)


# -- output names cannot escape or collide ---------------------------------------------------
def test_input_names_cannot_leave_the_output_folder_nor_collide(tmp_path):
    digit = np.load(ALL_DIGITS[0])
    names = ["...npy", ".npy", "manifest.json.npy", "overview.png.npy", "a b.npy", "esegeta.log.npy"]
    paths = []
    for n, name in enumerate(names):
        folder = tmp_path / "in" / str(n)
        folder.mkdir(parents=True)
        np.save(folder / "tmp.npy", digit)
        (folder / "tmp.npy").rename(folder / name)
        paths.append(folder / name)
    for n in (1, 2):
        (tmp_path / "x" / str(n)).mkdir(parents=True)
        np.save(tmp_path / "x" / str(n) / "x.npy", digit)
        paths.append(tmp_path / "x" / str(n) / "x.npy")
    cfg = digits_config(tmp_path, [{"id": "captum.Saliency"}], inputs=paths)
    cfg["output"]["formats"] = ["npy", "png"]
    result = Pipeline(cfg).run()
    assert result.exit_code == 0, [r["error"] for r in result.runs]
    out = result.output_dir.resolve()
    inputs = [r["input"] for r in result.runs]
    assert len(set(inputs)) == len(paths) and all(inputs)
    reserved = {"manifest.json", "overview.png", "esegeta.log", ".esegeta.lock", JOURNAL}
    for r in result.runs:
        assert r["input"] not in reserved and not r["input"].startswith(".")
        for f in r["files"].values():
            where = (out / f).resolve()
            assert out in where.parents and where.is_file() and where.parent != out
    assert (out / "manifest.json").is_file() and (out / "overview.png").is_file()
    assert result.result("captum.Saliency", inputs[0]).shape == digit.shape


# -- a bad output.dir --------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["file", "nul", "read-only"])
def test_bad_output_dir_exits_2_naming_it(tmp_path, capsys, case):
    cfg = digits_config(tmp_path, [{"id": "captum.Saliency"}], inputs=ALL_DIGITS[:1])
    if case == "file":
        (tmp_path / "out").write_text("a file")
    elif case == "nul":
        cfg["output"]["dir"] = str(tmp_path / "o\x00ut")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o500)
        cfg["output"]["dir"] = str(tmp_path / "ro" / "out")
    code, _, err = run_cli(["run", write_config(tmp_path, cfg)], capsys)
    assert code == 2 and "esegeta: invalid: output.dir:" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="^output.dir: "):
        Pipeline(cfg).run()


# -- methods that patch torch process-wide run alone ------------------------------------------
EXCLUSIVE_SCENARIO = [{"id": "torchray.excitation_backprop", "layer": "layer2"},
                      {"id": "captum.Saliency"}, {"id": "captum.GuidedBackprop"}, {"id": "captum.InputXGradient"},
                      {"id": "captum.IntegratedGradients", "params": {"n_steps": 16}}]


def _exclusive_runs_equal_the_serial_run(tmp_path) -> None:
    pytest.importorskip("torchray")
    serial = Pipeline(digits_config(tmp_path / "one", EXCLUSIVE_SCENARIO)).run()
    assert serial.exit_code == 0
    for attempt in range(3):
        many = Pipeline(digits_config(tmp_path / f"many{attempt}", EXCLUSIVE_SCENARIO, threads_per_device=4)).run()
        for a, b in zip(serial.runs, many.runs):
            assert b["status"] == "ok", (attempt, b["label"], b["error"])
            assert np.allclose(serial.result(a["label"], a["input"]), many.result(b["label"], b["input"]),
                               atol=1e-6), (attempt, b["label"], b["input"])


def test_torchray_methods_are_marked_exclusive_and_run_alone(tmp_path):
    """TorchRay swaps torch.relu and friends process-wide: its adapter marks those methods
    exclusive, and four worker threads then give the serial results (before: Captum jobs beside
    excitation_backprop failed with "forward() got an unexpected keyword argument 'weight'")."""
    patching = {"deconvnet", "guided_backprop", "excitation_backprop", "contrastive_excitation_backprop"}
    for name in patching:
        assert registry.get(f"torchray.{name}").exclusive, name
    assert not registry.get("torchray.gradient").exclusive and not registry.get("captum.Saliency").exclusive
    _exclusive_runs_equal_the_serial_run(tmp_path)


# -- units: the retry policy, the gate, names, the journal ------------------------------------
def test_retry_policy_halves_on_out_of_memory_then_falls_back_to_fp32(tmp_path):
    from esegeta.run.executor import RetryPolicy

    sizes, precisions = [], []

    def attempt(precision, params):
        precisions.append(precision)
        sizes.append(params.get("internal_batch_size"))
        if params.get("internal_batch_size", 16) > 4:  # as PickyNet: the user's model runs out of memory
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (a user model)")
        return torch.full((1, 2), float("nan")) if precision == "bf16" else torch.ones(1, 2)

    def shrink(params):
        size = params.get("internal_batch_size", 16)
        return {**params, "internal_batch_size": size // 2} if size > 1 else None

    done = RetryPolicy(("bf16", "fp32")).run(attempt, {"n_steps": 16}, shrink, finite=lambda r: bool(
        torch.isfinite(r).all()))
    assert done.precision == "fp32" and done.oom_retries == 2 and done.settings["internal_batch_size"] == 4
    assert sizes == [None, 8, 4, 4] and precisions == ["bf16", "bf16", "bf16", "fp32"]
    assert "non-finite result in bf16" in done.fallback
    with pytest.raises(torch.cuda.OutOfMemoryError):
        RetryPolicy(("fp32",)).run(attempt, {}, lambda p: None, finite=lambda r: True)


def test_gate_runs_exclusive_jobs_alone():
    from esegeta.run.executor import Gate

    gate, inside, log = Gate(), threading.Event(), []
    release = threading.Event()

    def reader():
        with gate.shared():
            log.append("shared in")
            inside.set()
            release.wait(5)
            log.append("shared out")

    def writer():
        inside.wait(5)
        with gate.exclusive():
            log.append("exclusive")

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    assert log == ["shared in"]  # the exclusive job waits for the shared one
    release.set()
    for t in threads:
        t.join(5)
    assert log == ["shared in", "shared out", "exclusive"]


@pytest.mark.parametrize("name, safe", [("..", "input"), ("", "input"), (".hidden", "hidden"),
                                        ("manifest.json", "manifest.json_"), ("a b/c", "a_b_c"),
                                        ("x", "x"), ("ü-1.2", "_-1.2"), ("esegeta.log", "esegeta.log_")])
def test_safe_name(name, safe):
    from esegeta.io.outputs import safe_name

    assert safe_name(name) == safe


def test_previous_ignores_a_torn_journal_line(tmp_path):
    from esegeta.spec.config import OutputConfig
    from esegeta.run.writer import Writer

    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "m.npy").write_bytes(b"x")
    good = {"label": "m", "input": "a", "status": "ok", "key": "k", "files": {"npy": "a/m.npy"}}
    (out / JOURNAL).write_text(json.dumps(good) + "\n" + json.dumps({**good, "input": "b"})[:30])
    with Writer(out, OutputConfig(), resume=True) as writer:
        assert writer.previous() == {("m", "a"): good}
