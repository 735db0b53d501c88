"""Size and time to first render of ``report.html`` for finished runs (run on demand, not in the tests).

    python benchmarks/report_viewer.py RUN_DIR [RUN_DIR ...] [--shots DIR]

Per run folder: the report is rebuilt from the folder with this checkout's code (as
``esegeta report RUN_DIR`` does; timed), into a copy so the run stays as it was; then its size,
and in Debian's headless Chromium (tests/helpers_browser.py) the time to the first contentful
paint, to ``load``, and, for a 3D run, to the moment the interactive viewer has drawn its first
overlay; console errors and network requests; a full-page screenshot. To compare with another
version, run the copy of this script that lies in that version's checkout (its own code builds).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

#: A JS expression true once every viewer on the page has drawn (or when there is none).
VIEWERS_READY = ("() => [...document.querySelectorAll('.viewer[data-viewer]')].every(v => v.dataset.ready)")


def measure(run_dir: Path, shots: Path) -> dict:
    import helpers_browser
    from esegeta.show import report

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / run_dir.name
        shutil.copytree(run_dir, copy)
        start = time.perf_counter()
        path = report.write_report(copy)
        build_s = time.perf_counter() - start
        html = path.read_text(encoding="utf-8")
        facts = {"run": str(run_dir), "build_s": round(build_s, 2), "size_mb": round(path.stat().st_size / 1e6, 2),
                 "viewers": html.count("data-viewer=")}
        if helpers_browser.missing():
            return {**facts, "browser": helpers_browser.missing()}
        seen = helpers_browser.render(path, wait_for=VIEWERS_READY, screenshot=shots / f"{run_dir.name}.png",
                                      timeout_s=120)
    return {**facts, "first_render_s": seen["first_render_s"], "load_and_viewers_s": round(seen["load_s"], 2),
            "console_errors": seen["console_errors"], "requests": seen["requests"],
            "screenshot": str(shots / f"{run_dir.name}.png")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--shots", type=Path, default=Path(tempfile.gettempdir()) / "esegeta-report-shots")
    args = parser.parse_args()
    args.shots.mkdir(parents=True, exist_ok=True)
    for run_dir in args.runs:
        print(json.dumps(measure(run_dir, args.shots)))


if __name__ == "__main__":
    main()
