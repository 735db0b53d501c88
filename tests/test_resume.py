"""``esegeta run --resume``: after a real ``kill -9`` of the CLI in the middle of a run,
resuming finishes it without recomputing what was done and without partial files; and what
"the same result" means (esegeta.io.resume)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esegeta.run.runner import Pipeline
from helpers_cli import DIGITS, REPO, run_cli
from test_runtime import OWN_MODELS, digits_config

ALL_DIGITS = sorted(DIGITS.glob("*.npy"))


def slow_config(tmp_path: Path) -> dict:
    """4 inputs x 2 methods on a model sleeping 30 ms per forward: 0.3-0.5 s per job."""
    (tmp_path / "own_models.py").write_text(OWN_MODELS.replace("time.sleep(0.2)", "time.sleep(0.03)"))
    methods = [{"id": "captum.FeatureAblation", "params": {"feature_mask": {"grid": [2, 2]}}},
               {"id": "captum.FeatureAblation", "label": "fa2", "params": {"feature_mask": {"grid": [2, 4]}}}]
    cfg = digits_config(tmp_path, methods)
    cfg["model"] = {"factory": f"{tmp_path / 'own_models.py'}:SlowNet"}
    cfg["target"] = 3
    return cfg


def _manifest_runs(out: Path) -> list[dict]:
    try:
        return json.loads((out / "manifest.json").read_text())["runs"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def _journal_runs(out: Path) -> list[dict]:
    """The results a running (or killed) run has finished: its journal's records (esegeta.run.writer)."""
    path = out / ".esegeta-journal.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return [r for r in records if "label" in r]


def test_resume_after_kill_9(tmp_path, capsys):
    cfg = slow_config(tmp_path)
    out = Path(cfg["output"]["dir"])
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "esegeta", "run", str(config)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if len(_journal_runs(out)) >= 2:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()  # the journal is the record until the run ends
    done = _journal_runs(out)
    assert 2 <= len(done) < 8 and all(r["status"] == "ok" for r in done)
    stamps = {f: (out / f).stat().st_mtime_ns for r in done for f in r["files"].values()}
    stale = out / ALL_DIGITS[0].stem / ".tmp-999999-deadbeef-fa2.npy"  # as a kill while writing leaves it
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half")

    code, _, err = run_cli(["run", config, "--resume"], capsys)
    assert code == 0, err
    runs = _manifest_runs(out)
    assert len(runs) == 8 and all(r["status"] == "ok" for r in runs)
    assert [(r["label"], r["input"]) for r in runs] == [(m, p.stem) for p in ALL_DIGITS for m in
                                                         ("captum.FeatureAblation", "fa2")]
    kept = {(r["label"], r["input"]) for r in done}
    for r in runs:
        assert r.get("resumed", False) == ((r["label"], r["input"]) in kept)
    assert {f: (out / f).stat().st_mtime_ns for f in stamps} == stamps  # nothing done was rewritten
    assert not list(out.rglob(".tmp-*"))
    for r in runs:
        assert all((out / f).is_file() for f in r["files"].values())


def test_what_counts_as_the_same_result(tmp_path):
    methods = [{"id": "captum.Saliency"}, {"id": "captum.IntegratedGradients", "params": {"n_steps": 8}}]
    cfg = digits_config(tmp_path, methods, inputs=ALL_DIGITS[:2])
    first = Pipeline(cfg).run()
    out = first.output_dir
    # nothing changed: everything kept
    again = Pipeline(cfg, resume=True).run()
    assert all(r.get("resumed") for r in again.runs) and again.exit_code == 0
    # other params for one method, a missing file for another result: only those recomputed
    cfg["methods"][1]["params"]["n_steps"] = 16
    (out / first.runs[0]["files"]["npy"]).unlink()
    changed = Pipeline(cfg, resume=True).run()
    resumed = {(r["label"], r["input"]): bool(r.get("resumed")) for r in changed.runs}
    assert resumed == {("captum.Saliency", ALL_DIGITS[0].stem): False,
                       ("captum.IntegratedGradients", ALL_DIGITS[0].stem): False,
                       ("captum.Saliency", ALL_DIGITS[1].stem): True,
                       ("captum.IntegratedGradients", ALL_DIGITS[1].stem): False}
    # devices, threads and time limits do not change the numbers: kept
    cfg["runtime"].update(threads_per_device=2, timeout_s=600)
    assert all(r.get("resumed") for r in Pipeline(cfg, resume=True).run().runs)
    # one more input: only its results are computed (Captum methods do not fit on the run's inputs)
    cfg["inputs"]["paths"].append(str(ALL_DIGITS[2]))
    added = {r["input"]: bool(r.get("resumed")) for r in Pipeline(cfg, resume=True).run().runs}
    assert added == {ALL_DIGITS[0].stem: True, ALL_DIGITS[1].stem: True, ALL_DIGITS[2].stem: False}
    # the seed does: recomputed; and without --resume everything is recomputed
    cfg["runtime"]["seed"] = 1
    assert not any(r.get("resumed") for r in Pipeline(cfg, resume=True).run().runs)
    assert not any(r.get("resumed") for r in Pipeline(cfg).run().runs)


def test_failed_and_timed_out_results_are_retried(tmp_path):
    cfg = slow_config(tmp_path)
    cfg["inputs"]["paths"] = cfg["inputs"]["paths"][:1]
    cfg["methods"] = cfg["methods"][:1]
    cfg["runtime"]["timeout_s"] = 0.1
    first = Pipeline(cfg).run()
    assert first.runs[0]["status"] == "timeout"
    cfg["runtime"].pop("timeout_s")
    second = Pipeline(cfg, resume=True).run()
    assert second.runs[0]["status"] == "ok" and not second.runs[0].get("resumed")


@pytest.mark.parametrize("content", ["{not json", json.dumps({"runs": [{"status": "ok"}]})])
def test_unreadable_manifest_means_recompute(tmp_path, content):
    cfg = digits_config(tmp_path, [{"id": "captum.Saliency"}], inputs=ALL_DIGITS[:1])
    out = Path(cfg["output"]["dir"])
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(content)
    result = Pipeline(cfg, resume=True).run()
    assert result.exit_code == 0 and not result.runs[0].get("resumed")
