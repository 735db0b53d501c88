"""Report and explorer benchmarks (run on demand, not in the test suite).

    python benchmarks/report.py [--n 1797] [--out /tmp/esegeta-report-bench] [--skip-report] [--skip-explorer]

1. ``report.html`` of the demo run (``configs/retina.json``: 2 retina crops x 18 methods) and of the
   digits run (``configs/digits.json``: 4 digits x 16 methods): the run itself, the time to build
   the report again from the folder (``esegeta report RUN_DIR``), its size, and in Debian's headless
   Chromium the time to the first contentful paint and to ``load``, console errors, network
   requests, and how many panels are blank; a full-page screenshot.
2. Explorer on all 1,797 scikit-learn digits (scaled as samples/train_digits.py does) on the sample
   DigitResNet: Saliency and Integrated Gradients computed with ``esegeta.explain`` in batches
   of 256 (target: the predicted class), then the page (UMAP of the inputs, of each method's
   maps and of both together); the time of each step and the total (goal: at most 2 minutes),
   the page's size and the same Chromium figures; a screenshot with a hover tooltip open.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # upstream bars, as the command line silences them

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


#: The page has rendered: Bokeh's document exists and the explorer's panel has its height.
READY = ("() => window.Bokeh && Bokeh.documents.length > 0 && "
         "document.querySelector('[data-panel=explorer]').getBoundingClientRect().height > 100")


def _browser(path: Path, screenshot: Path, wait_for: str | None = None, interact=None) -> dict:
    import helpers_browser

    reason = helpers_browser.missing()
    if reason:
        return {"skipped": reason}
    interact = helpers_browser.hover_explorer if interact == "hover" else interact
    r = helpers_browser.render(path, screenshot=screenshot, wait_for=wait_for, interact=interact)
    blank = [name for name, spread in r["panels"] if spread < 1.0]
    return {"first_render_s": r["first_render_s"], "load_s": round(r["load_s"], 3),
            "console_errors": r["console_errors"], "requests": r["requests"], "panels": len(r["panels"]),
            "blank_panels": blank, "screenshot": str(screenshot), "interaction": r["interaction"]}


def bench_report(config: str, out: Path) -> dict:
    from esegeta.show import report
    from esegeta.run.runner import Pipeline

    start = time.perf_counter()
    result = Pipeline(ROOT / "configs" / config, output_dir=out).run()
    run_s = time.perf_counter() - start
    own = out / "report_of_the_run.html"  # the run's own report (frozen-mask outlines included)
    shutil.copy(out / "report.html", own)
    drawn = re.findall(r"report: \d+ input\(s\) drawn in ([0-9.]+) s", (out / "esegeta.log").read_text())
    start = time.perf_counter()
    report.write_report(out)
    rebuild_s = time.perf_counter() - start
    return {"config": config, "results": len(result.runs), "run_s": round(run_s, 1),
            "report_build_in_run_s": float(drawn[-1]) if drawn else None, "report_rebuild_s": round(rebuild_s, 2),
            "report_bytes": own.stat().st_size, "browser": _browser(own, out / "report.png")}


def bench_explorer(n: int, out: Path) -> dict:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    import esegeta
    from esegeta.show import explorer
    from samples.models import DigitResNet

    torch.manual_seed(0)
    timings = {}
    start, cpu = time.perf_counter(), time.process_time()
    digits = load_digits()
    x = torch.from_numpy(digits.images[:n].astype(np.float32) / 16.0)[:, None]
    labels = digits.target[:n].tolist()
    model = DigitResNet()
    model.load_state_dict(torch.load(ROOT / "samples" / "checkpoints" / "digit_resnet.pt", weights_only=True))
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(b).argmax(1) for b in x.split(256)])
    maps = {}
    for method, params in (("captum.Saliency", {}), ("captum.IntegratedGradients", {"n_steps": 32})):
        t = time.perf_counter()
        maps[method] = torch.cat([esegeta.explain(model, b, method, target="predicted", **params)
                                  for b in x.split(256)]).numpy()
        timings[f"{method}_s"] = round(time.perf_counter() - t, 2)
    timings["data_and_attributions_s"] = round(time.perf_counter() - start, 2)
    t = time.perf_counter()
    data = explorer.Dataset(x.numpy(), maps, [f"digit {i}" for i in range(n)], labels, predicted.tolist())
    page = explorer.build(data, title=f"esegeta explorer: {n} scikit-learn digits")
    timings["page_s"] = round(time.perf_counter() - t, 2)
    path = out / "explorer.html"
    path.write_text(page, encoding="utf-8")
    timings["total_s"] = round(time.perf_counter() - start, 2)
    timings["total_cpu_s"] = round(time.process_time() - cpu, 2)  # the machine is shared: CPU time beside wall time
    timings["load_average_1min"] = os.getloadavg()[0]
    agreement = float((predicted.numpy() == np.asarray(labels)).mean())
    return {"inputs": n, **timings, "explorer_bytes": path.stat().st_size, "accuracy": round(agreement, 4),
            "browser": _browser(path, out / "explorer.png",
                                READY, "hover")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1797, help="digits in the explorer (default: all 1,797)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/esegeta-report-bench"))
    parser.add_argument("--skip-report", action="store_true")
    parser.add_argument("--skip-explorer", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("NUMBA_CACHE_DIR", str(args.out / "numba-cache"))
    args.out.mkdir(parents=True, exist_ok=True)
    figures = {}
    if not args.skip_report:
        for config in ("retina.json", "digits.json"):
            figures[f"report_{config}"] = bench_report(config, args.out / config.removesuffix(".json"))
            print(json.dumps(figures[f"report_{config}"], indent=2), flush=True)
    if not args.skip_explorer:
        figures["explorer"] = bench_explorer(args.n, args.out)  # screenshot: 'all methods' with a tooltip open
        print(json.dumps(figures["explorer"], indent=2), flush=True)
    (args.out / "figures.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
