"""SIGINT and SIGTERM during a threaded run (issue 26): exit 130 / 143, no C++ abort, no
traceback, every finished result journaled, no temporary file left, and ``--resume`` keeps every
one of them. Real ``esegeta run`` subprocesses on a model that sleeps in its forward pass; the
signal is sent while jobs run (after the first result is journaled)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esegeta.run.writer import Writer
from esegeta.spec import config as config_mod
from helpers_cli import REPO, write_config
from test_resume import slow_config

JOURNAL = ".esegeta-journal.jsonl"


def _journaled_ok(out: Path) -> set[tuple[str, str]]:
    path = out / JOURNAL
    done = set()
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("reset"):
            done = set()
        elif record.get("status") == "ok":
            done.add((record["label"], record["input"]))
    return done


@pytest.mark.parametrize("signum, code, formats", [(signal.SIGINT, 130, ["npy"]),
                                                   (signal.SIGTERM, 143, ["npy", "zarr"])])
def test_a_signal_during_a_threaded_run_exits_cleanly_and_keeps_what_finished(tmp_path, signum, code, formats):
    """With ``zarr`` the stores' rows are still buffered when the run stops: the results are kept
    all the same (they once were all recomputed)."""
    cfg = slow_config(tmp_path)
    cfg["output"]["formats"] = formats
    (tmp_path / "own_models.py").write_text((tmp_path / "own_models.py").read_text().replace(
        "time.sleep(0.03)", "time.sleep(0.15)"))
    cfg["runtime"]["threads_per_device"] = 2
    out = Path(cfg["output"]["dir"])
    config = write_config(tmp_path, cfg)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "esegeta", "run", str(config)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _journaled_ok(out):
            assert process.poll() is None, process.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no result journaled in 120 s"
            time.sleep(0.02)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == code, err[-3000:]
    assert "terminate called" not in err and "Traceback" not in err, err[-3000:]
    assert "interrupted" in err
    assert not (out / "manifest.json").exists(), "the run had finished before the signal: make it slower"
    assert not list(out.rglob(".tmp-*"))
    done = _journaled_ok(out)
    assert done
    parsed, _ = config_mod.read(config)
    with Writer(out, parsed.output, resume=True) as writer:  # what --resume keeps
        kept = set(writer.previous())
    assert kept == done
