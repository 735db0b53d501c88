"""CPU versus CUDA: every registered method on every sample model, on both devices.

    python benchmarks/devices.py [--csv results/gpu/devices.csv] [--only ID ...]

One row per (method, sample): the CPU status, the CUDA status (``ok`` or the error's type
and first line) and the Pearson r of the CUDA result with the CPU's, in full fp32 (TF32
off), computed as the conformance suite's CUDA lane does (tests/test_conformance.py), and
whether the method draws random numbers (``random``: its CPU result changes with the seed;
the devices' streams differ, so its r is shown but not held to 0.99). A markdown table goes to stdout, the CSV to ``--csv``.
Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

COLUMNS = ("method", "sample", "cpu", "cuda", "r", "random")


def _status(fn) -> tuple[str, object]:
    """(``ok`` or the error in one line, the result or None)."""
    try:
        return "ok", fn()
    except Exception as exc:  # a table of outcomes: every failure is a row, not the end of the run
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        return f"{type(exc).__name__}: {first}", None


def _finite(attr) -> str:
    import torch

    return "ok" if bool(torch.isfinite(attr).all()) else "non-finite"


def compare(method_id: str, case) -> dict:
    """One row: the method on the case on the CPU and on CUDA, and their agreement."""
    from esegeta.spec import registry
    from test_conformance import agreement_with_cpu, on_device

    spec = registry.get(method_id)
    row = {"method": method_id, "sample": case.name}
    cpu, cpu_attr = _status(lambda: on_device(spec, case, "cpu")[0])
    cuda, cuda_attr = _status(lambda: on_device(spec, case, "cuda")[0])
    row["cpu"] = _finite(cpu_attr) if cpu == "ok" else cpu
    row["cuda"] = _finite(cuda_attr) if cuda == "ok" else cuda
    row["r"], row["random"] = "", ""
    if cpu == "ok" and cuda == "ok":
        status, agreement = _status(lambda: agreement_with_cpu(spec, case, cuda_attr))
        if status == "ok":
            row["r"], row["random"] = f"{agreement[0]:.5f}", "yes" if agreement[1] else "no"
        else:
            row["r"] = status
    return row


def rows(only: list[str] | None = None):
    """Every applicable (method, sample) row, as it is computed."""
    from conftest import CASES
    from esegeta.spec import registry

    cases = [make() for make in CASES.values()]
    for method_id in sorted(only or registry.all_methods()):
        spec = registry.get(method_id)
        for case in cases:
            if case.dims in spec.dims and case.task in spec.tasks:
                yield compare(method_id, case)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, help="write the table as CSV here too")
    parser.add_argument("--only", nargs="*", help="method ids (default: every registered method)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/devices.py compares CPU and CUDA results: it needs CUDA, and this machine has none "
              "(scripts/gpu_lane.sh runs it on the GPU machine).")
        return 0
    warnings.filterwarnings("ignore", category=UserWarning)
    writer = None
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        handle = args.csv.open("w", newline="")
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows(args.only):
        print("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |", flush=True)
        if writer is not None:
            writer.writerow(row)
            handle.flush()
    if writer is not None:
        handle.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
