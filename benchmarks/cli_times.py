"""Wall times of the ``esegeta`` commands on the sample configs, each in a fresh process.

Compares checkouts: ``--root`` names one or more source trees (default: this one); each
command runs ``--repeats`` times with that tree first on ``PYTHONPATH`` and the median is
reported. ``validate``/``check`` run on every config in ``configs/`` (check once by default:
it runs a forward pass per method). ``--cold`` gives every run an empty cache of upstream
parameters (:mod:`esegeta.spec.signatures`): the first run after an install or an upgrade.

    OMP_NUM_THREADS=1 python benchmarks/cli_times.py --root /tmp/base --root . --json times.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(root: Path, args: list[str], repeats: int, cold: bool = False) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(root), "TQDM_DISABLE": "1"}
    times, code = [], 0
    for _ in range(repeats):
        if cold:
            env["ESEGETA_CACHE_DIR"] = tempfile.mkdtemp(prefix="esegeta-cold-")
        start = time.perf_counter()
        code = subprocess.run([sys.executable, "-m", "esegeta", *args], cwd=root, env=env, capture_output=True,
                              timeout=1800).returncode
        times.append(time.perf_counter() - start)
    return statistics.median(times), code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, action="append", help="source tree(s) to time (default: this one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-repeats", type=int, default=1)
    parser.add_argument("--configs", nargs="*", help="config names (default: every configs/*.json but schema)")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--cold", action="store_true", help="an empty cache of upstream parameters for every run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    roots = [r.resolve() for r in (args.root or [ROOT])]
    names = args.configs or sorted(p.name for p in (ROOT / "configs").glob("*.json") if p.name != "schema.json")
    commands: list[tuple[str, list[str], int]] = [("--help", ["--help"], args.repeats),
                                                  ("methods", ["methods"], args.repeats)]
    commands += [(f"validate {n}", ["validate", f"configs/{n}"], args.repeats) for n in names]
    if not args.no_check:
        commands += [(f"check {n}", ["check", f"configs/{n}"], args.check_repeats) for n in names]
    rows = []
    print(f"{'command':42}" + "".join(f"{r.name[:18]:>20}" for r in roots))
    for label, argv, repeats in commands:
        cells = [timed(root, argv, repeats, args.cold) for root in roots]
        rows.append({"command": label, **{str(r): {"seconds": round(t, 2), "exit": c} for r, (t, c) in zip(roots, cells)}})
        print(f"{label:42}" + "".join(f"{t:>14.2f} s (rc {c})" for t, c in cells), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
