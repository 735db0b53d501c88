"""Throughput and memory of dataset runs (run on demand, not in the test suite).

    python benchmarks/throughput.py [--n 1797] [--small 200] [--batch 64] [--skip-single]
                                    [--only local ray ray-started-by-run small]

Saliency and Integrated Gradients (captum defaults: 50 steps) on the sample DigitResNet over
scikit-learn's digits (all 1,797, written as ``.npy`` files to a temporary folder, scaled as
samples/train_digits.py does), output format ``zarr`` (the attribution datasets) only. Each run
is a fresh Python process (``Pipeline(config).run()``), so its peak resident memory
(``ru_maxrss``) is its own. Rows:

1. one at a time (``runtime.batch_size`` 1) against batched (``--batch``), local backend;
2. the Ray backend on this machine (a local cluster started before the clock, as a running
   cluster would be; its start time is reported apart), batched, against the local backend;
   the two runs' stores must be equal to the bit; and ``ray-started-by-run``: the cluster
   ``esegeta run`` starts itself (its start-up inside the clock, as a user meets it);
3. peak memory at ``--small`` and ``--n`` inputs (local, batched): the inputs are streamed, so
   it does not grow with their number (runs use ``MALLOC_ARENA_MAX=2``, see :func:`measure`).

Wall time is the whole run (listing and scanning the inputs, model preparation, jobs, writing);
CPU seconds are those of the run's process tree: the driver's own, plus every process below it
(Ray's raylet, GCS and workers, which the driver does not reap itself) sampled with ``psutil``
every 0.2 s while the run goes (the last 0.2 s of a process can be missed).

Measured on 2 shared CPU cores, ``OMP_NUM_THREADS=1`` (torch 2.13, CPU only)::

    | run                          | backend | batch | inputs | wall s | inputs/s | peak RSS MB |
    | one at a time, local         | local   |     1 |   1797 |   97.4 |       18 |         372 |
    | batched, local               | local   |    64 |   1797 |   24.6 |       73 |         598 |
    | batched, ray                 | ray     |    64 |   1797 |   18.0 |      100 |         478 |
    | batched, local, fewer inputs | local   |    64 |    200 |    5.3 |       37 |         724 |

Batched is 4.0x one at a time; the Ray backend takes 0.73x the local time (its actor computes
while the driver writes; the local cluster's 8.5 s start is not counted) with identical stores;
peak memory does not grow with the inputs (its spread, 598-724 MB, is the allocator's around
Integrated Gradients' 3,200-row batches; the driver's under Ray). That 0.73x did not hold (issue 26:
1.40x / 2.05x on a quiet machine). ``--n 900 --only local ray ray-started-by-run`` on the shared
machine at load 5-7 (three trials; CPU of Ray's processes counted in the third only)::

    | trial | local wall s | ray (started before) wall | ray (started by the run) wall | CPU ray / local |
    | 1     | 56.3         | 1.38x                     | 0.66x                         | (not counted)   |
    | 2     | 69.0         | 1.11x                     | 1.17x                         | (not counted)   |
    | 3     | 76.4         | 1.15x                     | 1.83x                         | 1.88x / 1.80x   |
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = [{"id": "captum.Saliency"}, {"id": "captum.IntegratedGradients"}]


def write_digits(n: int, folder: Path) -> None:
    import numpy as np
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(load_digits().images[:n].astype(np.float32) / 16.0):
        np.save(folder / f"digit{i:04d}.npy", image[None])


def config(inputs: Path, out: Path, batch: int, backend: str) -> dict:
    backend = "ray" if backend.startswith("ray") else backend
    return {"model": {"factory": str(ROOT / "samples/models.py") + ":DigitResNet",
                      "weights": str(ROOT / "samples/checkpoints/digit_resnet.pt")},
            "inputs": {"paths": [str(inputs)], "spatial_dims": 2},
            "runtime": {"devices": "cpu", "batch_size": batch, "backend": backend, "seed": 0},
            "output": {"dir": str(out), "formats": ["zarr"]},
            "methods": METHODS}


class _TreeCPU:
    """CPU seconds of the processes below this one (Ray's), sampled in a thread until :meth:`stop`."""

    def __init__(self):
        import threading

        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.2):
            for proc in me.children(recursive=True):
                try:
                    t = proc.cpu_times()
                    self.seen[proc.pid] = t.user + t.system + t.children_user + t.children_system
                except psutil.Error:
                    pass

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self.seen.values())


def child(spec: dict) -> None:
    """One run in this process; prints its figures as JSON."""
    sys.path.insert(0, str(ROOT))
    import logging

    from esegeta.run.runner import Pipeline

    logging.getLogger("esegeta").setLevel(logging.WARNING)
    init = None
    if spec["backend"] == "ray":  # a running cluster (ray-started-by-run: the run starts its own)
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        init = time.perf_counter() - start
    tree = _TreeCPU()
    start = time.perf_counter()
    result = Pipeline(spec["config"]).run()
    wall = time.perf_counter() - start
    below = tree.stop()
    ok = sum(r["status"] == "ok" for r in result.runs)
    own = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": wall, "ok": ok, "runs": len(result.runs), "init": init,
                      "cpu": own.ru_utime + own.ru_stime + below,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(name: str, inputs: Path, out: Path, n: int, batch: int, backend: str) -> dict:
    spec = {"config": config(inputs, out, batch, backend), "backend": backend}
    # two malloc arenas: glibc otherwise gives each new job thread an arena of its own (up to 8 per core),
    # so resident memory would grow with the number of jobs until the arenas run out, whatever the inputs
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "MALLOC_ARENA_MAX": "2"}
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=out_file,
                                stderr=err_file, text=True, env=env)
        proc.wait()
        out_file.seek(0)
        err_file.seek(0)
        stdout, stderr = out_file.read(), err_file.read()
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{stderr[-3000:]}")
    figures = json.loads(lines[-1])
    assert figures["ok"] == figures["runs"] == 2 * n, figures
    return {"name": name, "backend": backend, "batch": batch, "inputs": n, **figures}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1797)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--skip-single", action="store_true", help="no one-at-a-time run (the slowest)")
    parser.add_argument("--only", nargs="+", choices=["local", "ray", "ray-started-by-run", "small"],
                        help="only these batched rows (the Ray rows compare with 'local')")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    import numpy as np
    import zarr

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_digits(args.n, tmp / "all")
        write_digits(args.small, tmp / "small")
        runs = [("batched, local", "all", args.n, args.batch, "local"),
                ("batched, ray", "all", args.n, args.batch, "ray"),
                ("batched, ray started by the run", "all", args.n, args.batch, "ray-started-by-run"),
                ("batched, local, fewer inputs", "small", args.small, args.batch, "local")]
        if args.only:
            runs = [r for r in runs if (r[4] if r[1] == "all" else "small") in args.only]
        elif not args.skip_single:
            runs.insert(0, ("one at a time, local", "all", args.n, 1, "local"))
        for name, folder, n, batch, backend in runs:
            out = tmp / name.replace(", ", "-").replace(" ", "_")
            rows.append(measure(name, tmp / folder, out, n, batch, backend))
            rows[-1]["out"] = out
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "out"}), flush=True)
        local = next((r for r in rows if r["name"] == "batched, local"), None)
        remotes = [r for r in rows if r["backend"].startswith("ray")]
        for remote in remotes if local else []:
            for method in ("captum.Saliency", "captum.IntegratedGradients"):
                a = zarr.open_group(str(local["out"] / "attributions" / f"{method}.zarr"), mode="r")["attributions"][:]
                b = zarr.open_group(str(remote["out"] / "attributions" / f"{method}.zarr"), mode="r")["attributions"][:]
                assert np.array_equal(a, b), f"{method}: the Ray backend's results differ from the local backend's"
    print(f"\nSaliency + IntegratedGradients (50 steps) on the digit ResNet, {os.cpu_count()} CPU core(s), "
          f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}, output format zarr\n")
    print("| run | backend | batch | inputs | wall s | CPU s (process tree) | inputs/s (both methods) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['backend']} | {r['batch']} | {r['inputs']} | {r['wall']:.1f} | {r['cpu']:.1f} | "
              f"{r['inputs'] / r['wall']:.0f} | {r['rss_mb']:.0f} |")
    single = next((r for r in rows if r["batch"] == 1), None)
    if single and local:
        print(f"\nbatched / one at a time: {single['wall'] / local['wall']:.1f}x faster")
    for remote in remotes if local else []:
        started = (f"the local Ray cluster started in {remote['init']:.1f} s before the clock" if remote["init"]
                   else "the cluster's start-up included")
        print(f"{remote['name']} / local: {remote['wall'] / local['wall']:.2f}x the local wall time, "
              f"{remote['cpu'] / local['cpu']:.2f}x its CPU ({started}); stores identical")
    small = next((r for r in rows if r["inputs"] == args.small and r["name"].endswith("fewer inputs")), None)
    if small and local:
        print(f"peak RSS at {args.small} inputs: {small['rss_mb']:.0f} MB, at {args.n}: {local['rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
