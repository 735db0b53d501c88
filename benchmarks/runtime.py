"""Runtime benchmarks (run on demand, not in the test suite).

    python benchmarks/runtime.py [--n 200] [--repeats 3] [--threads N]

1. Batching: Saliency on 200 digit images (sklearn's ``load_digits``, scaled as
   samples/train_digits.py does) on the sample DigitResNet; throughput of batched versus
   one-at-a-time, (a) in ``esegeta.explain`` (one call on the 200 vs 200 calls on one) and
   (b) in the runner (``runtime.batch_size`` 200 vs 1, npy outputs): wall time of the whole
   run (loading, validation and 200 atomic file writes included), and the jobs' computing
   time (the manifest's seconds, summed).
2. Time-limit precision: seconds between the limit and the moment a method running in a
   worker thread is stopped: a forward loop on the digit classifier (Integrated Gradients,
   one step per forward) and on the 3D tissue U-Net (Occlusion), and a pure-Python loop
   (asynchronous exception only).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _digits(n: int, folder: Path) -> list[Path]:
    import numpy as np
    from sklearn.datasets import load_digits

    images = load_digits().images[:n].astype(np.float32) / 16.0
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"digit{i:04d}.npy")
        np.save(paths[-1], image[None])
    return paths


def _median_time(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_batching(n: int, repeats: int) -> dict:
    import numpy as np
    import torch

    import esegeta
    from conftest import digits_case
    from esegeta.run.runner import Pipeline

    model = digits_case().model
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = _digits(n, tmp)
        x = torch.from_numpy(np.stack([np.load(p) for p in paths]))
        batched = _median_time(lambda: esegeta.explain(model, x, "captum.Saliency", target=3), repeats)
        single = _median_time(lambda: [esegeta.explain(model, x[i:i + 1], "captum.Saliency", target=3)
                                       for i in range(n)], repeats)
        # reference: Captum called directly on the same prepared copy (the ceiling for explain's ratio)
        from captum.attr import Saliency

        from esegeta.attribution.prepare import prepared

        copy = prepared(model, x)
        captum_batched = _median_time(lambda: Saliency(copy).attribute(x.clone().requires_grad_(), target=3), repeats)
        captum_single = _median_time(lambda: [Saliency(copy).attribute(x[i:i + 1].clone().requires_grad_(), target=3)
                                              for i in range(n)], repeats)

        def run(batch_size: int) -> tuple[float, float]:
            """(wall seconds of the run, seconds its jobs computed: the manifest's per-input seconds)."""
            cfg = {"model": {"factory": f"{ROOT / 'samples/models.py'}:DigitResNet",
                             "weights": str(ROOT / "samples/checkpoints/digit_resnet.pt")},
                   "inputs": {"paths": [str(tmp)], "spatial_dims": 2}, "target": "predicted",
                   "runtime": {"devices": "cpu", "batch_size": batch_size},
                   "output": {"dir": str(tmp / f"out{batch_size}"), "formats": ["npy"]},
                   "methods": [{"id": "captum.Saliency"}]}
            pipeline = Pipeline(cfg)
            start = time.perf_counter()
            result = pipeline.run()
            assert result.exit_code == 0 and len(result.runs) == n
            return time.perf_counter() - start, sum(r["seconds"] for r in result.runs)

        batched_runs = [run(n) for _ in range(repeats)]
        single_runs = [run(1) for _ in range(repeats)]
        run_batched, run_single = (statistics.median(w for w, _ in r) for r in (batched_runs, single_runs))
        jobs_batched, jobs_single = (statistics.median(c for _, c in r) for r in (batched_runs, single_runs))
    return {"inputs": n,
            "explain_one_call_s": batched, "explain_one_at_a_time_s": single,
            "explain_speedup": single / batched,
            "captum_direct_speedup": captum_single / captum_batched,
            "runner_batch_size_n_s": run_batched, "runner_batch_size_1_s": run_single,
            "runner_speedup": run_single / run_batched,
            "runner_jobs_batch_size_n_s": jobs_batched, "runner_jobs_batch_size_1_s": jobs_single,
            "runner_jobs_speedup": jobs_single / jobs_batched}


def bench_time_limits(limits=(0.5, 1.0, 2.0)) -> dict:
    import esegeta
    from conftest import digits_case, tissue_case
    from esegeta.attribution.prepare import prepared
    from esegeta.run.timeouts import TimeLimitExceeded, call_with_limit

    def overrun(fn, limit, modules=()) -> float:
        start = time.monotonic()
        try:
            call_with_limit(fn, limit, modules)
        except TimeLimitExceeded:
            return time.monotonic() - start - limit
        raise RuntimeError("the job finished before its limit: make it longer")

    out: dict[str, list[float]] = {}
    d = digits_case()
    copy = prepared(d.model, d.x)
    out["digits_IntegratedGradients_forward_loop"] = [overrun(
        lambda: esegeta.explain(d.model, d.x, "captum.IntegratedGradients", target=3, n_steps=10**5,
                                internal_batch_size=1, method="riemann_trapezoid"), limit, copy.modules())
        for limit in limits]
    t = tissue_case()
    copy = prepared(t.model, t.x)
    out["tissue3d_Occlusion_forward_loop"] = [overrun(
        lambda: esegeta.explain(t.model, t.x, "captum.Occlusion", target=2, wrapper=t.wrapper,
                                sliding_window_shapes=[1, 2, 2, 2], strides=1), limit, copy.modules())
        for limit in limits]

    def spin():
        while True:
            pass

    out["python_loop_async_exception"] = [overrun(spin, limit) for limit in limits]
    return {"limits_s": list(limits), "seconds_past_limit": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    report = {"torch_threads": torch.get_num_threads(), "batching": bench_batching(args.n, args.repeats),
              "time_limits": bench_time_limits()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
