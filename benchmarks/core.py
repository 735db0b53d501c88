"""Benchmarks for the core issue (run on demand, not in the test suite).

    python benchmarks/core.py [--repeats 30] [--skip-demo]

1. ``esegeta.explain`` time / the direct Captum call: Integrated Gradients, 64 steps, the
   two alternated in one process, on the digit classifier and the retina U-Net (wrapped).
2. Wall time of ``esegeta --help`` and ``esegeta methods`` (fresh processes, median).
3. ``esegeta demo`` wall time and each method's seconds (from its manifest).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _alternate(ours, theirs, repeats: int) -> dict:
    """Median times of the two, alternated ABBA so that drift (caches, clocks) cancels."""
    for _ in range(3):
        ours(), theirs()  # warm up (the prepared copy is made and cached here)
    t_ours, t_theirs = [], []

    def timed(fn, into):
        start = time.perf_counter()
        fn()
        into.append(time.perf_counter() - start)

    for i in range(repeats):
        pair = [(ours, t_ours), (theirs, t_theirs)]
        for fn, into in (pair if i % 2 == 0 else pair[::-1]):
            timed(fn, into)
    return {"esegeta_s": statistics.median(t_ours), "captum_s": statistics.median(t_theirs),
            "ratio": statistics.median(t_ours) / statistics.median(t_theirs),
            "median_paired_ratio": statistics.median(a / b for a, b in zip(t_ours, t_theirs)),
            "overhead_ms": (statistics.median(t_ours) - statistics.median(t_theirs)) * 1e3,
            "repeats": repeats}


def bench_explain(repeats: int) -> dict:
    import torch
    from captum.attr import IntegratedGradients

    import esegeta
    from conftest import digits_case, retina_case

    torch.set_num_threads(2)
    results = {}
    d = digits_case()
    results["digits_classifier"] = _alternate(
        lambda: esegeta.explain(d.model, d.x, "captum.IntegratedGradients", target=3, n_steps=64),
        lambda: IntegratedGradients(d.model).attribute(d.x, target=3, n_steps=64), repeats)

    r = retina_case(size=64)
    with torch.no_grad():
        mask = (torch.sigmoid(r.model(r.x))[:, 0] > 0.5).float()

    def score(inp):
        prob = torch.sigmoid(r.model(inp))[:, 0]
        return torch.stack([(prob * (1 - mask)).sum((1, 2)), (prob * mask).sum((1, 2))], dim=1)

    wrapper = {"name": "threshold", "threshold": 0.5, "activation": "sigmoid"}
    results["retina_unet_threshold_wrapper_64px"] = _alternate(
        lambda: esegeta.explain(r.model, r.x, "captum.IntegratedGradients", target=1, n_steps=64, wrapper=wrapper),
        lambda: IntegratedGradients(score).attribute(r.x, target=1, n_steps=64), max(5, repeats // 3))
    return results


def _wall(cmd: list[str], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_cli() -> dict:
    exe = str(Path(sys.executable).with_name("esegeta"))
    return {"help_s": _wall([exe, "--help"]), "methods_s": _wall([exe, "methods"])}


def bench_demo() -> dict:
    exe = str(Path(sys.executable).with_name("esegeta"))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([exe, "demo", "--output", tmp], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        manifest = json.loads((Path(tmp) / "manifest.json").read_text())
    per_method: dict[str, list[float]] = {}
    for run in manifest["runs"]:
        per_method.setdefault(run["label"], []).append(run["seconds"])
    return {"wall_s": wall, "jobs": len(manifest["runs"]),
            "statuses": sorted({r["status"] for r in manifest["runs"]}),
            "seconds_per_method": {k: [round(s, 3) for s in v] for k, v in per_method.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    report = {"explain_vs_captum": bench_explain(args.repeats), "cli": bench_cli()}
    if not args.skip_demo:
        report["demo"] = bench_demo()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
