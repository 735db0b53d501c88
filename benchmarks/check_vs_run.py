"""``esegeta check``'s predictions against the real calls, per method of each sample config.

For every method entry of a config, ``check`` predicts the forward/backward passes per input,
the time (from one timed forward pass) and the peak memory. This script then runs each entry
once on the config's first input, as a run computes it (``esegeta.explain`` with the entry's
settings), and measures: forward rows through the model (a global forward hook on the model's
class, as tests/test_cost.py counts), backward rows (a gradient hook on each output), wall
time, and the peak growth of the process's resident memory (sampled every 2 ms; CPU only,
so allocator caching makes it rough).

    OMP_NUM_THREADS=1 python benchmarks/check_vs_run.py configs/digits.json configs/retina.json --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

import esegeta  # noqa: E402
from esegeta.spec import config as config_mod  # noqa: E402
from esegeta.run import plan as planning  # noqa: E402
from esegeta.run.check import _size, check  # noqa: E402
from esegeta.spec.config import resolve  # noqa: E402


@contextlib.contextmanager
def counted(model_class: type):
    rows = {"forward": 0, "backward": 0}

    def on_grad(grad):
        rows["backward"] += int(grad.shape[0]) if grad.ndim else 1

    def hook(module, args, output):
        if type(module) is model_class and args and torch.is_tensor(args[0]):
            rows["forward"] += int(args[0].shape[0])
            if torch.is_tensor(output) and output.requires_grad:
                output.register_hook(on_grad)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield rows
    finally:
        handle.remove()


@contextlib.contextmanager
def peak_rss():
    process, peak, stop = psutil.Process(), {"bytes": 0}, threading.Event()
    base = process.memory_info().rss

    def sample():
        while not stop.is_set():
            peak["bytes"] = max(peak["bytes"], process.memory_info().rss - base)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def measure(path: Path) -> list[dict]:
    report = check(path)
    cfg, base = config_mod.read(path)
    plan = planning.plan(cfg, base, every_entry=True)
    x = plan.inputs[0].tensor
    rows = []
    for m in report.methods:
        entry = cfg.methods[m.index]
        e = resolve(entry, cfg, m.index).request
        kwargs = dict(wrapper=e.wrapper.model_dump(exclude_unset=True) if e.wrapper else None, layer=e.layer,
                      noise_tunnel=dict(e.noise_tunnel) if e.noise_tunnel is not None else None,
                      patch=e.patch.model_dump(exclude_unset=True) if e.patch else None)
        if e.wrapper is not None and e.wrapper.mask:
            kwargs["wrapper"]["mask"] = str(base / e.wrapper.mask)
        if e.wrapper is not None and ".py:" in e.wrapper.name:  # a custom wrapper's file, relative to the config
            kwargs["wrapper"]["name"] = str((base / e.wrapper.name.split(":")[0]).resolve()) + ":" + \
                e.wrapper.name.split(":")[1]
        target = e.target if e.spec.needs_target else None
        error = None
        with counted(type(plan.model)) as n, peak_rss() as peak:
            start = time.perf_counter()
            try:
                esegeta.explain(plan.model, x, e.spec.id, target, **kwargs, **dict(e.params))
            except Exception as exc:  # noqa: BLE001 (a failure is a result here)
                error = f"{type(exc).__name__}: {str(exc)[:120]}"
            seconds = time.perf_counter() - start
        rows.append({"config": path.name, "label": m.label, "id": m.id, "check_ok": m.ok,
                     "predicted": {"forward": m.forward_rows, "backward": m.backward_rows, "exact": m.passes_exact,
                                   "seconds": m.seconds, "memory": m.memory_bytes},
                     "measured": {"forward": n["forward"], "backward": n["backward"], "seconds": round(seconds, 4),
                                  "rss_growth": peak["bytes"], "error": error}})
        p, r = rows[-1]["predicted"], rows[-1]["measured"]
        print(f"{path.name:28} {m.label[:26]:26} passes {_n(p['forward'])}+{_n(p['backward'])} vs {r['forward']}+"
              f"{r['backward']}  time {_t(p['seconds'])} vs {_t(r['seconds'])}  memory {_size(p['memory'])} vs "
              f"{_size(r['rss_growth'])}" + (f"  ERROR {error}" if error else ""), flush=True)
    return rows


def _n(v):
    return "?" if v is None else str(v)


def _t(v):
    return "?" if v is None else f"{v:.3f}s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [row for path in args.configs for row in measure(path)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
