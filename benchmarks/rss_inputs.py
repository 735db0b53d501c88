"""Peak resident memory of a streamed run against its number of inputs (run on demand, not in the suite).

    nice -n 10 python benchmarks/rss_inputs.py [--counts 200 2000 20000] [--source files|dataset]
                                               [--formats zarr] [--trim-every N]

``captum.Saliency`` with a tiny CNN (:class:`TinyNet`) on ``--counts`` inputs of 1×128×128
(written as ``.npy`` files, or given by a dataset factory: :class:`Noise`), output format
``--formats``. Each run is a fresh Python process (``Pipeline(config).run()``) with the machine's
default allocator settings (no ``MALLOC_ARENA_MAX``), so its peak resident set (``ru_maxrss``)
is its own. The inputs are streamed, so a run's peak must not grow with their number: the
issue's measure (26) was 632 → 738 → 934 MB at 150 / 1,500 / 3,000 inputs with live tensors
flat, native memory the allocator kept. ``--arena-max N`` sets ``MALLOC_ARENA_MAX``; ``--trim-every 0``
turns the runner's periodic ``malloc_trim`` off (``ESEGETA_MALLOC_TRIM_EVERY``) to show what it changes.

Measured on the shared 2-core machine (torch 2.13 CPU, ``OMP_NUM_THREADS=1``, dataset source, zarr,
``nice -n 5 python benchmarks/rss_inputs.py --counts 200 2000 20000``; load 5-7 from other work)::

    | inputs | gathered: peak MB | records in memory: peak MB | records on disk: peak MB | jobs made as taken: peak MB |
    | 200    | 392               | 357                        | 358 / 355 / 377          | 381 / 382                   |
    | 2,000  | 707               | 362                        | 366 / 364 / 388          | 387 / 390                   |
    | 20,000 | (not run)         | 417                        | 393 / 399 / 420          | 394 / 396                   |
    | spread |                   | +16.6 %                    | +9.8 / +12.5 / +11.4 %   | +3.4 / +3.6 %               |

Gathered: every job gathered the run's samples (all N inputs) and the scan filled the cache;
``MALLOC_ARENA_MAX=1`` without trimming (631 MB at 2,000) and trimming alone (651 MB) did not
help. Records in memory: the run's records (about 1.5 KB of Python objects a result, the
manifest's rows, measured with ``tracemalloc``). Records on disk (:mod:`esegeta.run.records`):
two runs of an earlier stop and a third the day of the next change (the same machine as its
figures); what grew was ~1.4 KB of live objects per input (``tracemalloc``, 1,000 against 3,000
inputs: Job objects 350 B, input references 180 B, their paths 380 B, resume keys 190 B, digests
and shapes 185 B, the stores' names and paths 250 B) and about as much again of heap pages they
pinned. Jobs made as taken (:class:`esegeta.run.plan.Jobs`, :mod:`esegeta.run.memory`): what is
held per input is its slotted reference and 32 bytes of digest (``tracemalloc``, once the jobs and
the references were compact: ~0.5 KB an input, of which the stores' names and paths and the digest
strings, since compacted too); two runs. ``--source files`` (20,000 ``.npy`` files): 377 / 387 /
398 MB (+5.5 %); the source's list of ``Path`` objects held as text instead measured the same
(379 / 387 / 401), so it stays a list.
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

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (1, 128, 128)


class TinyNet(nn.Module):
    """A 10-class CNN for 1×128×128 inputs (random weights, seeded)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x))))).flatten(1))


class Noise(torch.utils.data.Dataset):
    """``n`` inputs of 1×128×128, input ``i`` drawn from seed ``i`` (the same on every read)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(SHAPE, generator=torch.Generator().manual_seed(int(i)))


def write_inputs(n: int, folder: Path) -> None:
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.save(folder / f"x{i:05d}.npy", Noise(n)[i].numpy())


def config(n: int, source: str, inputs: Path, out: Path, formats: list[str]) -> dict:
    given = ({"paths": [str(inputs)], "spatial_dims": 2} if source == "files" else
             {"dataset": f"{Path(__file__).resolve()}:Noise", "dataset_kwargs": {"n": n}, "spatial_dims": 2})
    return {"model": {"factory": f"{Path(__file__).resolve()}:TinyNet"}, "inputs": given, "target": 0,
            "runtime": {"devices": "cpu", "seed": 0}, "output": {"dir": str(out), "formats": formats},
            "methods": [{"id": "captum.Saliency"}]}


def child(spec: dict) -> None:
    """One run in this process; prints its figures as JSON."""
    sys.path.insert(0, str(ROOT))
    import logging

    from esegeta.run.runner import Pipeline

    logging.getLogger("esegeta").setLevel(logging.WARNING)
    start = time.perf_counter()
    result = Pipeline(spec["config"]).run()
    wall = time.perf_counter() - start
    with open("/proc/self/status", encoding="ascii") as status:
        rss_end = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
    print(json.dumps({"wall": wall, "ok": sum(r["status"] == "ok" for r in result.runs), "runs": len(result.runs),
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_end_mb": rss_end}))


def measure(n: int, source: str, inputs: Path, out: Path, formats: list[str], trim_every: int | None,
            arena_max: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MALLOC_ARENA_MAX", None)
    if arena_max is not None:
        env["MALLOC_ARENA_MAX"] = str(arena_max)
    if trim_every is not None:
        env["ESEGETA_MALLOC_TRIM_EVERY"] = str(trim_every)
    spec = {"config": config(n, source, inputs, out, formats)}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{n} inputs failed:\n{done.stderr[-3000:]}")
    figures = json.loads(lines[-1])
    assert figures["ok"] == figures["runs"] == n, figures
    return {"inputs": n, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[200, 2000, 20000])
    parser.add_argument("--source", choices=["files", "dataset"], default="dataset")
    parser.add_argument("--formats", nargs="+", default=["zarr"])
    parser.add_argument("--trim-every", type=int, help="ESEGETA_MALLOC_TRIM_EVERY for the runs (0: off)")
    parser.add_argument("--arena-max", type=int, help="MALLOC_ARENA_MAX for the runs (default: glibc's)")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in args.counts:
            inputs = tmp / f"inputs-{n}"
            if args.source == "files":
                write_inputs(n, inputs)
            rows.append(measure(n, args.source, inputs, tmp / f"out-{n}", args.formats, args.trim_every,
                                args.arena_max))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\ncaptum.Saliency, TinyNet, 1x128x128 inputs from {args.source}, formats {args.formats}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')}, trim every "
          f"{args.trim_every if args.trim_every is not None else 'default'}, MALLOC_ARENA_MAX "
          f"{args.arena_max or 'default'}\n")
    print("| inputs | wall s | peak RSS MB | RSS at the end MB |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['inputs']} | {r['wall']:.1f} | {r['rss_mb']:.0f} | {r['rss_end_mb']:.0f} |")
    low, high = min(r["rss_mb"] for r in rows), max(r["rss_mb"] for r in rows)
    print(f"\npeak RSS spread: {high / low - 1:.1%} (flat: within 10 %)")


if __name__ == "__main__":
    main()
