"""Shared helpers for tests/test_cli.py and tests/test_config_errors.py.

A valid, cheap digits config (absolute paths into the repository's samples, one input,
Saliency only, output inside the test's tmp folder), writing it as a JSON file, and
running ``esegeta.cli.commands.main`` in-process with the console logging handler it installs
removed again afterwards (``main`` replaces its own handler on each call; removing it keeps a
handler left by one test from printing the log of a later test that runs esegeta from Python).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
FACTORY = f"{SAMPLES / 'models.py'}:DigitResNet"
WEIGHTS = SAMPLES / "checkpoints" / "digit_resnet.pt"
DIGITS = SAMPLES / "data" / "digits"
ONE_DIGIT = DIGITS / "digit_1_label0.npy"


def valid_config(tmp_path: Path, methods: list[dict] | None = None, **overrides: Any) -> dict:
    """A valid digits config with absolute paths; top-level keys can be overridden."""
    cfg = {
        "model": {"factory": FACTORY, "weights": str(WEIGHTS)},
        "inputs": {"paths": [str(ONE_DIGIT)], "spatial_dims": 2},
        "target": "predicted",
        "runtime": {"devices": "cpu", "seed": 0},
        "output": {"dir": str(tmp_path / "out"), "formats": ["npy", "png"]},
        "methods": copy.deepcopy(methods) if methods is not None else [{"id": "captum.Saliency"}],
    }
    cfg.update(copy.deepcopy(overrides))
    return cfg


def write_config(tmp_path: Path, cfg: Any, name: str = "config.json") -> Path:
    """``cfg`` as a JSON file (a ``str`` is written as is, for broken JSON)."""
    path = tmp_path / name
    path.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg, indent=2))
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``esegeta.cli.commands.main(argv)`` in-process: (return code, stdout, stderr)."""
    from esegeta.cli.commands import main

    log = logging.getLogger("esegeta")
    before = list(log.handlers)
    capsys.readouterr()  # drop anything printed before
    try:
        code = main([str(a) for a in argv])
    finally:
        for handler in log.handlers[:]:
            if handler not in before:
                log.removeHandler(handler)
    out, err = capsys.readouterr()
    return code, out, err


def output_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (empty if it does not exist)."""
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []
