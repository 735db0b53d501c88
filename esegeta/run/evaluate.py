"""Evaluation as the run layer owns it: after ``esegeta run``, and ``esegeta evaluate`` on a finished run.

"Run, then evaluate" has one owner, as MONAI's engines own the loop: the runner calls
:func:`after_run` once the attributions are written; ``esegeta evaluate CONFIG`` reads the
``.npy`` files a finished run's ``manifest.json`` lists (:func:`evaluate_plan`; nothing is
recomputed: :func:`esegeta.run.runner.evaluate_run`). The metrics themselves, and the scoring
loop, are :mod:`esegeta.evaluation`: it imports nothing from here.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esegeta.evaluation.engine import SCORED_KINDS, configured, mask_files, score
from esegeta.evaluation.roar import roar_for_plan
from esegeta.io.loading import load_mask
from esegeta.io.outputs import save_json
from esegeta.run.plan import Plan

log = logging.getLogger("esegeta")


def _saved(plan: Plan, out: Path, manifest: Mapping[str, Any]) -> tuple[dict, dict, list[str]]:
    """(attributions by (label, input), requests by label, what is not scored and why) of a run."""
    entries = {e.label: e for e in plan.entries}
    items = {item.name: item for item in plan.inputs}
    attributions, requests, skipped = {}, {}, []
    for r in manifest.get("runs", []):
        label, name = r.get("label"), r.get("input")
        e = entries.get(label)
        if e is None or name not in items:
            continue
        if e.spec.kind not in SCORED_KINDS:
            skipped.append(f"{label} on {name}: a {e.spec.kind} result explains no class score")
            continue
        if r.get("status") != "ok" or "npy" not in r.get("files", {}):
            skipped.append(f"{label} on {name}: no saved .npy (status {r.get('status')}; output.formats needs 'npy')")
            continue
        saved = np.load(out / r["files"]["npy"])
        attributions[(label, name)] = torch.from_numpy(np.ascontiguousarray(items[name].model_order(saved)))[None]
        requests[label] = e.request
    return attributions, requests, skipped


def _masks_of(plan: Plan) -> dict[str, torch.Tensor] | None:
    files = mask_files(plan.config, plan.base_dir)
    if files is None:
        return None
    return {item.name: load_mask(f, plan.base_dir) for item, f in zip(plan.inputs, files)}


def evaluate_plan(plan: Plan, out: Path, manifest: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    """Score a run's saved attributions; writes the files and returns the manifest's ``evaluation``."""
    ev = plan.config.evaluation
    metrics = configured(ev)
    attributions, requests, skipped = _saved(plan, Path(out), manifest)
    log.info("evaluation: %d metric(s) on %d saved result(s)", len(metrics), len(attributions))
    inputs = [(item.name, item.tensor.to(plan.device)) for item in plan.inputs]
    result = score(plan.model, inputs, attributions, requests, metrics, overrides=ev.overrides,
                   masks=_masks_of(plan), base_dir=plan.base_dir, max_batch=ev.max_batch, seed=ev.seed)
    result.skipped = skipped + result.skipped
    files = result.save(out, token)
    section = {**result.manifest({item.name: list(item.tensor.shape[1:]) for item in plan.inputs}), "files": files}
    if ev.roar is not None:
        section["roar"] = roar_for_plan(plan, out, token)
        section["files"]["roar"] = "evaluation_roar.csv"
    manifest["evaluation"] = section
    save_json(Path(out) / "manifest.json", manifest, token)
    log.info("evaluation: %d value(s) in %s, ranking in %s (%.1fs)", len(result.rows), files["values"],
             files["table"], result.seconds)
    return section


def after_run(plan: Plan, out: Path, manifest: dict[str, Any], token: str | None = None) -> None:
    """The hook of ``esegeta run``: evaluate if the config asks; a failure is logged, no result is lost."""
    ev = plan.config.evaluation
    if ev is None or not ev.enabled:
        return
    try:
        evaluate_plan(plan, out, manifest, token)
    except Exception as exc:  # noqa: BLE001 (the attributions are written: `esegeta evaluate` retries)
        log.error("evaluation failed: %s: %s (the attributions are saved; `esegeta evaluate CONFIG` retries)",
                  type(exc).__name__, exc)


__all__ = ["after_run", "evaluate_plan"]
