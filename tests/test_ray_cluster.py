"""``runtime.ray_address`` on a cluster of two nodes simulated on this machine: ``ray start --head``
(no CPUs: nothing runs there) and a worker node with its own temporary and working directories.
The model file, its weights, a custom wrapper and inputs from outside the config's folder reach
the worker through Ray's ``runtime_env``, with this process's esegeta; past the shipping limit the
run is refused before anything is computed, naming the files. Marked ``ray_cluster`` (``-m "not
ray_cluster"`` leaves it out); skipped when the cluster cannot start. The cluster is stopped by
ending the processes of the two sessions this test started (``ray stop`` would end every Ray
cluster on the machine, other users' too)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from helpers_cli import REPO, run_cli

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray_cluster

SAMPLES = REPO / "samples"
START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """The processes of session ``sid`` (a ``ray start --block`` started with a session of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def _end_session(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for pid in _session_pids(proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    proc.wait(5)


def _start(args: list[str], cwd: Path, log: Path, nodes: list) -> None:
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip("no `ray` command beside this Python")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cwd.mkdir(parents=True)
    with log.open("wb") as out:
        proc = subprocess.Popen([str(ray_cli), "start", "--block", "--disable-usage-stats", *args], cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    nodes.append(proc)
    deadline = time.monotonic() + START_TIMEOUT_S
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.skip(f"the Ray node did not start: {log.read_text(errors='replace')[-500:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster():
    """(address, the worker node's temporary directory) of a head node and one worker node."""
    if ray.is_initialized():
        ray.shutdown()
    root = Path(tempfile.mkdtemp(prefix="esr-"))  # short: Ray's socket paths under it must fit in 107 bytes
    port = _free_port()
    nodes: list[subprocess.Popen] = []
    try:
        _start(["--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                f"--temp-dir={root / 'head-tmp'}"], root / "head-cwd", root / "head.log", nodes)
        _start([f"--address=127.0.0.1:{port}", "--num-cpus=2", f"--temp-dir={root / 'worker-tmp'}"],
               root / "worker-cwd", root / "worker.log", nodes)
        yield f"127.0.0.1:{port}", root / "worker-tmp"
    finally:
        for proc in reversed(nodes):
            _end_session(proc)
        shutil.rmtree(root, ignore_errors=True)


def config(folder: Path, backend: str, out: str, address: str | None = None) -> Path:
    """The vessel U-Net from a file in ``folder``, its weights, a custom wrapper beside them, and two
    retina crops given by absolute paths outside ``folder``."""
    folder.mkdir(exist_ok=True)
    shutil.copy(SAMPLES / "models.py", folder / "models.py")
    shutil.copy(SAMPLES / "checkpoints" / "vessel_unet2d.pt", folder / "vessel_unet2d.pt")
    shutil.copy(REPO / "wrappers" / "connected_component.py", folder / "component.py")
    runtime = {"devices": "cpu", "seed": 0, "backend": backend, **({"ray_address": address} if address else {})}
    cfg = {"model": {"factory": "models.py:VesselUNet2D", "weights": "vessel_unet2d.pt"},
           "inputs": {"paths": [str(SAMPLES / "data" / "retina_crop.png"), str(SAMPLES / "data" / "retina_crop2.png")],
                      "spatial_dims": 2},
           "wrapper": {"name": "component.py:component", "options": {"threshold": 0.5}}, "target": 1,
           "runtime": runtime, "output": {"dir": out, "formats": ["npy"]}, "methods": [{"id": "captum.Saliency"}]}
    path = folder / f"{out}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_the_run_files_and_esegeta_reach_a_worker_node(cluster, tmp_path, capsys):
    address, worker_tmp = cluster
    code, _, err = run_cli(["run", config(tmp_path / "cfg", "ray", "ray-out", address)], capsys)
    assert code == 0, err[-3000:]
    manifest = json.loads((tmp_path / "cfg" / "ray-out" / "manifest.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["ok", "ok"]
    # What the worker node received, in its own temporary directory (the head node has no CPU for an actor).
    shipped = {p.relative_to(package).as_posix()
               for package in worker_tmp.glob("session_*/runtime_resources/working_dir_files/*") if package.is_dir()
               for p in package.rglob("*") if p.is_file()}
    assert {"model/models.py", "model/vessel_unet2d.pt", "wrapper0/component.py", "inputs/0/retina_crop.png",
            "inputs/1/retina_crop2.png"} <= shipped, shipped
    code_there = list(worker_tmp.glob("session_*/runtime_resources/py_modules_files/*/esegeta/run/backends/ray.py"))
    assert code_there and code_there[0].read_bytes() == (REPO / "esegeta" / "run" / "backends" / "ray.py").read_bytes()
    # The same numbers as the local backend.
    code, _, err = run_cli(["run", config(tmp_path / "cfg", "local", "local-out")], capsys)
    assert code == 0, err[-3000:]
    for name in ("retina_crop", "retina_crop2"):
        ours, theirs = (np.load(tmp_path / "cfg" / out / name / "captum.Saliency.npy") for out in ("local-out", "ray-out"))
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)  # the actor has its own intra-op threads


def test_files_past_the_shipping_limit_are_refused_before_computing(cluster, tmp_path, capsys, monkeypatch):
    from esegeta.run.backends import ray as ray_backend

    monkeypatch.setattr(ray_backend, "SHIP_LIMIT_BYTES", 4096)
    start = time.monotonic()
    code, _, err = run_cli(["run", config(tmp_path / "cfg", "ray", "out", cluster[0])], capsys)
    assert code == 2 and "runtime.ray_address" in err and "vessel_unet2d.pt" in err and "inputs.dataset" in err
    assert not (tmp_path / "cfg" / "out" / "manifest.json").exists() and not ray.is_initialized()
    assert time.monotonic() - start < 30
