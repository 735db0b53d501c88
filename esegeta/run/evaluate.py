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

from esegeta.errors import ConfigError, Problem
from esegeta.evaluation.engine import SCORED_KINDS, configured, mask_files, mask_problem, score
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


def mask_problems(plan: Plan) -> list[Problem]:
    """``evaluation.masks`` against the inputs, before anything runs: each mask's spatial shape is its input's."""
    ev = plan.config.evaluation
    if ev is None or ev.masks is None:
        return []
    found = []
    for item, file in zip(plan.inputs, mask_files(plan.config, plan.base_dir)):
        problem = mask_problem(load_mask(file, plan.base_dir), item.tensor.shape[2:])
        if problem is not None:
            found.append(Problem("evaluation.masks", f"{file.name} (input {item.name}): {problem}"))
    return found


def evaluate_plan(plan: Plan, out: Path, manifest: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    """Score a run's saved attributions; writes the files and returns the manifest's ``evaluation``."""
    ev = plan.config.evaluation
    metrics = configured(ev)
    attributions, requests, skipped = _saved(plan, Path(out), manifest)
    if not attributions:
        raise ConfigError("output.dir", f"{out} holds no saved attribution to score ("
                          + ("; ".join(skipped[:3]) or "the manifest lists no result") + "): run `esegeta run` "
                          "with \"npy\" in output.formats first")
    log.info("evaluation: %d metric(s) on %d saved result(s)", len(metrics), len(attributions))
    inputs = [(item.name, item.tensor.to(plan.device)) for item in plan.inputs]
    result = score(plan.model, inputs, attributions, requests, metrics, overrides=ev.overrides,
                   masks=_masks_of(plan), base_dir=plan.base_dir, max_batch=ev.max_batch, seed=ev.seed,
                   inference_copy=ev.inference_copy)
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


def after_run(plan: Plan, out: Path, manifest: dict[str, Any], token: str | None = None) -> str | None:
    """The hook of ``esegeta run``: evaluate if the config asks. No result is lost; what failed
    (the whole evaluation, or some of its values) is returned, for the run's exit code 1."""
    ev = plan.config.evaluation
    if ev is None or not ev.enabled:
        return None
    try:
        section = evaluate_plan(plan, out, manifest, token)
    except Exception as exc:  # noqa: BLE001 (the attributions are written: `esegeta evaluate` retries)
        log.error("evaluation failed: %s: %s (the attributions are saved; `esegeta evaluate CONFIG` retries)",
                  type(exc).__name__, exc)
        return f"evaluation failed: {exc}" if isinstance(exc, ConfigError) else \
            f"evaluation failed: {type(exc).__name__}: {exc}"
    failed = [r for r in section["values"] if r.get("error")]
    if failed:
        return (f"evaluation: {len(failed)} of {len(section['values'])} value(s) failed (first: {failed[0]['metric']} "
                f"on {failed[0]['label']}, {failed[0]['input']}: {failed[0]['error']})")
    return None


__all__ = ["after_run", "evaluate_plan", "mask_problems"]
