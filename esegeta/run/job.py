"""One job's computation, the same on every backend: a method on a batch of inputs, on one worker.

:func:`compute` runs the method under its time limit with the job's own seed, the retry policy
(out of memory: a smaller internal batch; reduced precision that fails: fp32) and the verdicts
(a non-finite result is ``failed``; a flat map warns), and returns a manifest record, the
result and its extras per input. The local executor's threads and the Ray actors both call it;
neither computes anything else, so their results are the same.
"""
from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esegeta.attribution import (architectures, conservation, numerics, patcher, scheduling, streamed, summaries,
                                 verdicts)
from esegeta.attribution.explainer import run
from esegeta.run import check as check_mod, progress
from esegeta.run.executor import RetryPolicy, Worker, attribute_warnings
from esegeta.run.plan import Job, Plan
from esegeta.run.timeouts import TimeLimitExceeded, call_with_limit
from esegeta.run.writer import FROZEN_MASK
from esegeta.spec import config as config_mod
from esegeta.spec import params as params_mod
from esegeta.spec.request import Request

log = logging.getLogger("esegeta")


def record(job: Job, item: Any, key: str, rt: config_mod.RuntimeConfig, device: torch.device | None = None,
            reason: str | None = None) -> dict[str, Any]:
    """A manifest record of ``job`` on ``item``, before it ran."""
    device = device or job.devices[0]
    return {"method": job.entry.spec.id, "label": job.entry.label, "input": item.name, "status": "ok",
            "seconds": None, "device": str(device), "error": None, "score": None, "shape": None, "files": {},
            "target": None, "predicted": None, "precision": None, "precision_reason": reason,
            "tf32": numerics.tf32_in_effect(rt.tf32, device),
            "warnings": [], "oom_retries": 0, "key": key,
            **({"input_label": item.label} if getattr(item, "label", None) is not None else {})}


def compute(plan: Plan, job: Job, worker: Worker) -> list[tuple[dict, np.ndarray | None, dict]]:
    """Explain one job's inputs on ``worker`` under its time limit: (record, result, extras) per input.

    The computation runs in a thread of its own (:func:`esegeta.run.timeouts.call_with_limit`); files
    are written afterwards by the writer, so a stopped job writes nothing."""
    e, device, rt = job.entry, worker.device, plan.config.runtime
    precision = numerics.precision_plan(e.spec, device, rt.amp)
    records = [record(job, item, key, rt, device, precision.reason) for (_, item), key in zip(job.items, job.keys)]
    tensors = [item.tensor for _, item in job.items]
    # one input: its own tensor (a cat copies it: a volume more at the peak; .to is a no-op on its device)
    x = (tensors[0] if len(tensors) == 1 else torch.cat(tensors)).detach().to(device)
    seed = scheduling.job_seed(rt.seed, e.index, job.items[0][0])
    rng: list[scheduling.JobRandomness] = []
    oom = [0]

    def attempt(name: str, request: Request):
        rng[:] = [scheduling.JobRandomness(seed, e.spec.uses_global_rng)]
        model = worker.replica(x)
        with rng[0], numerics.autocast(name, device), \
                progress.tracked(model, job.name, progress.expected_passes(request, x)):
            # the run's inputs as one batch only for a library that may read them (all in memory: N inputs)
            samples = worker.samples() if e.spec.library.reads_samples else None
            return _call(job, model, x, request, plan.base_dir, samples)

    def notify(kind: str, message: str) -> None:
        oom[0] += kind == "oom"
        log.warning("%s: %s", job.name, message)

    def compute():
        attribute_warnings(job.name)
        request = _patch_batch_from_budget(e.request, worker, x, rt, records)
        return RetryPolicy(precision.attempts).run(attempt, request, _halved,
                                                   lambda r: bool(torch.isfinite(r[0]).all()), notify)

    start = time.perf_counter()
    try:
        modules = list(worker.replica(x).modules()) if e.timeout_s else []
        done = call_with_limit(compute, e.timeout_s, modules, name=f"esegeta-job-{e.label}")
        return _results(plan, job, worker, x, records, done, precision.reason, time.perf_counter() - start)
    except TimeLimitExceeded as exc:
        worker.discard()  # upstream state may be left on the copy it ran on
        if rng:
            rng[0].release()  # the job may have been stopped before its own release
        status, error = "timeout", f"timeout: {exc}"
    except Exception as exc:  # noqa: BLE001 (isolation: one failing method never stops the others)
        log.debug("traceback of %s:\n%s", job.name, "".join(traceback.format_exception(type(exc), exc,
                                                                                        exc.__traceback__)))
        status, error = "failed", f"{type(exc).__name__}: {exc}"
    log.error("%s: %s" if status == "timeout" else "%s failed: %s", job.name, error)
    seconds = round(time.perf_counter() - start, 4)
    return [({**r, "status": status, "seconds": seconds, "error": error, "oom_retries": oom[0]}, None, {})
            for r in records]


def _call(job: Job, model, x: torch.Tensor, request: Request, base_dir: Path | None,
          samples: torch.Tensor | None):
    """The one call of the method (:func:`esegeta.attribution.explainer.run`): (result, scores per input, extras,
    the outcome's facts per input: :func:`_facts`)."""
    outcome = run(request, model, x, base_dir=base_dir, with_scores=True, samples=samples)
    return outcome.result, list(outcome.scores) or [None] * len(job.items), outcome.extras, _facts(outcome, request, x)


def _facts(outcome, request: Request, x: torch.Tensor) -> list[tuple[dict, torch.Tensor | None]]:
    """Per input: the record's resolved ``target`` and ``predicted`` column, the frozen mask and the
    axiom check (:class:`esegeta.attribution.conservation.Check` or None)."""
    n = x.shape[0]
    given = None if request.target in (None, "predicted") or not request.spec.needs_target else int(request.target)
    targets = list(outcome.targets) or [given] * n
    predicted = list(outcome.predicted) or [None] * n
    masks = list(outcome.masks) or [None] * n
    checks = list(outcome.checks) or [None] * n
    return [({"target": t, "predicted": p}, m, c) for t, p, m, c in zip(targets, predicted, masks, checks)]


def _patch_batch_from_budget(request: Request, worker: Worker, x: torch.Tensor, rt: config_mod.RuntimeConfig,
                             records: list[dict]) -> Request:
    """A global-patch request whose config sets no ``patch.batch_size``, with the largest that fits
    the memory budget (``runtime.memory_gb``, else what the device has free now; the estimate of
    :func:`esegeta.run.check.planned_peak`), recorded in each record's ``patch_batch_size``; else
    ``request`` unchanged."""
    patch = request.patch
    if patch is None or patch.mode != "global" or "batch_size" in patch.model_fields_set:
        return request
    budget = int(rt.memory_gb * 2**30) if rt.memory_gb is not None else check_mod.available_memory(worker.device)
    chosen = check_mod.patch_batch(request, worker.replica(x), x, budget)
    if chosen is None:
        return request
    source = f"runtime.memory_gb ({rt.memory_gb} GiB)" if rt.memory_gb is not None else \
        f"free memory on {worker.device} ({budget / 2**30:.1f} GiB)"
    for record in records:
        record["patch_batch_size"] = {"value": chosen, "from": source}
    log.info("patch.batch_size %d: the largest that fits %s", chosen, source)
    return request.replace(patch=patch.model_copy(update={"batch_size": chosen}))


def _halved(request: Request) -> Request | None:
    """The request with the method's internal batch parameter halved, or None (cannot shrink)."""
    smaller = params_mod.halve_batch(request.spec, request.params, request.noise_tunnel)
    return None if smaller is None else request.replace(params=smaller[0], noise_tunnel=smaller[1])


def _results(plan: Plan, job: Job, worker: Worker, x: torch.Tensor, records: list[dict], done, reason: str,
             elapsed: float):
    """Per input: the record completed with the verdict on its result, the result and its extras
    (``x`` is the job's batch on the worker's device)."""
    (attr, scores, extras, facts), request = done.value, done.settings
    extras = dict(extras)
    provenance = extras.pop(streamed.PROVENANCE, None)  # global patches: how the result was computed
    params, noise_tunnel = dict(request.params), request.noise_tunnel
    if attr.shape[0] != len(job.items):
        raise RuntimeError(f"the method returned {attr.shape[0]} results for {len(job.items)} inputs")
    seconds = round(elapsed / len(job.items), 4)
    # where the method's axiom (summation to delta, conservation) holds only approximately on this model
    # (a structural trace, gates: on a patch with patches, never the whole volume)
    notes = architectures.axiom_notes(job.entry.spec, architectures.network(worker.replica(x)),
                                      patcher.first_patch(x[:1], request.patch))
    computed = []
    for n, ((_, item), record) in enumerate(zip(job.items, records)):
        one = attr[n:n + 1]
        record.update(seconds=seconds, score=scores[n], shape=list(one.shape[1:]), precision=done.precision,
                      oom_retries=done.oom_retries, **facts[n][0])
        if done.fallback:
            record["precision_reason"] = f"{reason}; {done.fallback}"
        problem = verdicts.nonfinite_problem(one, x[n:n + 1], worker.replica(x), scores[n], job.entry.spec.axiom)
        if problem:
            record.update(status="failed", error=problem)
            log.error("%s on %s failed: %s", job.entry.label, item.name, problem)
            computed.append((record, None, {}))
            continue
        record["warnings"] += notes
        check = facts[n][2]
        if check is not None:
            record["conservation"] = check.record()
            off = conservation.warning(job.entry.spec, check, notes, request.wrapper)
            if off:
                record["warnings"].append(off)
                log.warning("%s on %s: %s", job.entry.label, item.name, off)
        flat = verdicts.flat_result_warning(one, params, job.entry.spec.parameters(), scores[n])
        if flat:
            record["warnings"].append(flat)
            log.warning("%s on %s: %s", job.entry.label, item.name, flat)
        if done.oom_retries:
            record["params"] = {**params, **({"noise_tunnel": dict(noise_tunnel)} if noise_tunnel else {})}
        if len(job.items) > 1:
            record["batch"] = len(job.items)
        if provenance is not None:
            record["provenance"] = provenance
        result = one[0].cpu().numpy()
        if plan.summaries is not None:
            record["summaries"] = _summaries(plan.summaries, job, worker, x[n:n + 1], request, result, record)
        computed.append((record, result, {**_extras_of(extras, n), FROZEN_MASK: facts[n][1]}))
    return computed


def _summaries(setting: summaries.Setting, job: Job, worker: Worker, x: torch.Tensor, request: Request,
               result: np.ndarray, record: dict) -> dict:
    """The record's region and channel totals (:mod:`esegeta.attribution.summaries`); a failure (of the
    prediction's forward pass, say) is noted there, never fails the result."""
    try:
        labels = setting.labels(worker.replica(x), x, request, record["input"])
        return setting.record(result, labels, tuple(x.shape[1:]))
    except Exception as exc:  # noqa: BLE001 (the result itself is fine: its totals are missing, with the cause)
        log.warning("%s on %s: summaries failed: %s: %s", job.entry.label, record["input"], type(exc).__name__, exc)
        return {"labels": setting.source, "rows": [], "notes": [f"summaries failed: {type(exc).__name__}: {exc}"]}


def _extras_of(extras: dict[str, Any], n: int) -> dict[str, Any]:
    """Input ``n``'s slice of a batch job's extra outputs (batch axis kept)."""
    def one(value):
        return value[n:n + 1] if torch.is_tensor(value) or isinstance(value, np.ndarray) else value

    return {k: ({kk: one(vv) for kk, vv in v.items()} if isinstance(v, dict) else one(v)) for k, v in extras.items()}
