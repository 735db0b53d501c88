"""How often, and how long, ``report.html`` reads a run's records (run on demand, not in the suite).

    nice -n 10 python benchmarks/report_reads.py [--inputs 6000] [--methods 1] [--root DIR]

A run's records are on disk (:class:`esegeta.run.records.Records`): every pass over
``manifest["runs"]`` reads and decodes each of them again. This builds the records of a run of
``--inputs`` inputs × ``--methods`` methods (copies of a real Saliency record), then times
:func:`esegeta.show.report.build_report` on them with no map to draw (the first inputs' pictures
are drawn, the same in every version), counting the records read. ``--root`` imports esegeta from
another checkout (the code before a change), so both are measured on the same machine.

Measured on the shared 2-core machine (``OMP_NUM_THREADS=1 nice -n 10``, 6,000 inputs, 1 method;
``--root`` a checkout of the code before)::

    | code                                          | records read | passes | CPU seconds |
    | before (a pass per input drawn, and 3 more)   | 138,000      | 23     | 2.12        |
    | after (one pass: ``report._Tally``)           | 6,000        | 1      | 0.99        |

The CPU time includes drawing the first 20 inputs' pictures (the same in both). A run's end reads
the records a few more times besides the report (the overview, the stores' index, ``summaries.csv``,
the manifest): one pass each.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=6000)
    parser.add_argument("--methods", type=int, default=1)
    parser.add_argument("--root", default=str(ROOT), help="the checkout whose esegeta is measured")
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    import esegeta  # noqa: F401 (before torchvision: esegeta.compat)
    import torch

    from esegeta.io.loading import InputItem
    from esegeta.run.records import Records
    from esegeta.show import report

    records = Records(args.inputs, args.methods)
    items = [InputItem(f"item-{k:05d}", Path(f"noise[{k}]"), torch.rand(1, 1, 32, 32)) for k in range(args.inputs)]
    for k, item in enumerate(items):
        for m in range(args.methods):
            records.put((k, m), {"method": "captum.Saliency", "label": f"Saliency{m}", "input": item.name,
                                 "status": "ok", "seconds": 0.01 + k * 1e-6, "device": "cpu", "error": None,
                                 "score": 0.5, "shape": [1, 32, 32], "files": {"npy": f"{item.name}/Saliency.npy"},
                                 "target": 0, "predicted": 3, "precision": "fp32", "precision_reason": None,
                                 "tf32": False, "warnings": [], "oom_retries": 0, "key": "0" * 32})
    reads = [0]
    read = records._read

    def counted(flat):
        reads[0] += 1
        return read(flat)

    records._read = counted
    manifest = {"esegeta": esegeta.__version__, "created": "now", "devices": ["cpu"], "config": {},
                "inputs": [{"name": item.name} for item in items], "runs": records}
    results = report.Results(lambda r, item: None)
    start = time.process_time()
    report.build_report(manifest, items, results)
    cpu = time.process_time() - start
    print(f"{esegeta.__file__}: {args.inputs} inputs x {args.methods} method(s): {reads[0]} records read "
          f"({reads[0] / len(records):.0f} passes), {cpu:.2f} s CPU")


if __name__ == "__main__":
    main()
