"""The runner: a config's methods over its inputs, with failure isolation and outputs.

``Pipeline(config).validate()`` checks everything a run needs without running a method
(:mod:`esegeta.planning`); ``Pipeline(config).run()`` then explains every (input, method) pair on
the workers of :mod:`esegeta.executor`, and :mod:`esegeta.writer` writes each result, its record
(durable before it is logged ok) and at the end the manifest and the overview. A failing method,
or a failing write, is recorded (status, error, traceback in the log) and the others go on;
``--resume`` finishes a run that was killed, recomputing nothing finished.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import logging
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, architectures, numerics, planning, progress, registry, scheduling, verdicts
from . import params as params_mod
from . import config as config_mod
from .executor import Executor, RetryPolicy, Worker, attribute_warnings
from .explainer import run
from .planning import Job, Plan
from .request import Request
from .timeouts import TimeLimitExceeded, call_with_limit
from .writer import FROZEN_MASK, Writer, check_dir

log = logging.getLogger("esegeta")
#: Distributions every run depends on; the explainer libraries' come from their adapters' records.
CORE_DISTRIBUTIONS = ("torch", "torchvision", "numpy", "torchio", "pydantic", "nibabel", "matplotlib")


def resolve_device(name: str | list[str] | None, where: str = "runtime.devices") -> torch.device:
    """The first of the devices ``name`` stands for (see :func:`esegeta.scheduling.resolve_devices`)."""
    return scheduling.resolve_devices(name, where)[0]


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"esegeta": __version__}
    for name in (*CORE_DISTRIBUTIONS, *registry.distributions()):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass
class RunResult:
    """What a run produced: the manifest (as written, or as it would have been if writing it
    failed: ``error``), its folder and the exit code."""

    output_dir: Path
    manifest: dict[str, Any]
    error: str | None = None

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.manifest["runs"]

    @property
    def exit_code(self) -> int:
        return 0 if self.error is None and all(r["status"] in ("ok", "skipped") for r in self.runs) else 1

    def result(self, method: str, input_name: str | None = None) -> np.ndarray:
        """The saved ``.npy`` of (method label or id, input) as a NumPy array, read back from the
        output folder (a run's results are files; :func:`esegeta.explain` returns the tensor of one
        call instead: ``torch.from_numpy`` turns one into the other)."""
        for r in self.runs:
            if method in (r["label"], r["method"]) and input_name in (None, r["input"]) and "npy" in r["files"]:
                return np.load(self.output_dir / r["files"]["npy"])
        raise KeyError(f"no saved result for {method!r} on {input_name!r}")


class Pipeline:
    """A configured run. ``config`` is a JSON file path or a dict (paths then relative to
    ``base_dir``, default the working directory)."""

    def __init__(self, config: str | Path | dict, *, output_dir: str | Path | None = None,
                 device: str | None = None, only: list[str] | None = None, base_dir: str | Path | None = None,
                 resume: bool = False):
        if isinstance(config, dict):
            self.config = config_mod.parse(config)
            self.base_dir = Path(base_dir).resolve() if base_dir else Path.cwd()
        else:
            self.config, self.base_dir = config_mod.read(config)
        self.output_override = Path(output_dir) if output_dir else None
        self.device_override = device
        self.only = list(only or [])
        self.resume = resume

    def validate(self) -> Plan:
        """Everything but running methods: raises ConfigError naming the fields at fault."""
        if self.config.evaluation is not None:  # metric ids, parameters, labels: before the model loads
            from .evaluation.run import check

            check(self.config, self.base_dir)
        with numerics.fp32_numerics(self.config.runtime.tf32):  # the wrappers' masks come from a forward pass
            plan = planning.plan(self.config, self.base_dir, only=self.only, device=self.device_override)
        plan.raise_problems()
        return plan

    @property
    def output_dir(self) -> Path:
        if self.output_override is not None:
            return self.output_override
        path = (self.base_dir or Path.cwd()) / self.config.output.dir
        return path if "\x00" in str(path) else path.resolve()  # check_dir names a NUL; resolve() cannot

    def run(self) -> RunResult:
        """Validate, then explain every (input, method) pair; see :class:`RunResult`.

        The manifest lists the results in a fixed order (input by input, methods in config order)."""
        plan = self.validate()
        out = check_dir(self.output_dir)
        with Writer(out, plan.config.output, resume=self.resume) as writer, _log_file(out / "esegeta.log"):
            _log_start(plan, out)
            kept, jobs = planning.jobs(plan, writer.previous())
            if self.resume:
                log.info("resume: %d result(s) kept from the earlier run, %d to compute",
                         len(kept), sum(len(j.items) for j in jobs))
            writer.begin(list(kept.values()), plan.inputs)
            records = dict(kept)
            _execute(plan, jobs, writer, records)
            manifest = {**_head(plan), "runs": [records[key] for key in sorted(records)]}
            error = None
            try:
                writer.finish(manifest, plan.inputs, {e.spec.id: e.spec.kind for e in plan.entries})
            except Exception as exc:  # noqa: BLE001 (every result is in the journal: --resume completes it)
                error = f"writing the manifest failed: {type(exc).__name__}: {exc}"
                log.error("%s; the results are recorded in %s (esegeta run --resume writes it)", error,
                          out / ".esegeta-journal.jsonl")
            if error is None and plan.config.evaluation is not None:
                from .evaluation.run import after_run

                after_run(plan, out, manifest, writer.token)
                if "report" in manifest:  # the report was written before the evaluation: add its section
                    from .report import update_evaluation

                    update_evaluation(out)
            failed = [r for r in manifest["runs"] if r["status"] != "ok"]
            log.info("done: %d ok, %d failed", len(manifest["runs"]) - len(failed), len(failed))
        return RunResult(out, manifest, error)


def _log_start(plan: Plan, out: Path) -> None:
    rt = plan.config.runtime
    log.info("esegeta %s: %d method(s) x %d input(s) on %s (%d thread(s) each) -> %s", __version__,
             len(plan.entries), len(plan.inputs), ", ".join(map(str, plan.devices)), rt.threads_per_device, out)
    for change in plan.ready.changes:
        log.info("prepared copy: %s", change)
    for item in plan.inputs:
        if not item.finite:
            log.warning("input %s holds non-finite values (NaN or Inf): its results will fail", item.name)


def _head(plan: Plan) -> dict[str, Any]:
    return {
        "esegeta": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "libraries": library_versions(),
        "config": plan.config.model_dump(mode="json", by_alias=True, exclude_none=True),
        "config_dir": str(plan.base_dir),
        "device": str(plan.device),
        "devices": [str(d) for d in plan.devices],
        "prepared_model": plan.ready.changes,
        "inputs": [{"name": item.name, "path": str(item.path), "shape": list(item.shape[1:]),
                    **({"label": item.label} if item.label is not None else {})} for item in plan.inputs],
    }


def _execute(plan: Plan, jobs: list[Job], writer: Writer, records: dict[tuple[int, int], dict]) -> None:
    """Compute ``jobs`` on the workers; each result is written and recorded as its job ends."""
    from tqdm import tqdm

    rt = plan.config.runtime
    executor = Executor(plan.devices, rt.threads_per_device, plan.model, plan.inputs, plan.ready, rt.tf32)
    with tqdm(total=len(jobs), desc="esegeta", unit="job", disable=None) as bar:
        def on_done(job: Job, computed: list[tuple[dict, np.ndarray | None, dict]]) -> None:
            saved = writer.save_all([(record, item, result, extras, job.entry.spec.kind)
                                     for (_, item), (record, result, extras) in zip(job.items, computed)])
            for (k, item), record in zip(job.items, saved):
                records[(k, job.position)] = record
                if record["status"] == "ok":
                    log.info("%s on %s: ok in %.2fs (%s)", job.entry.label, item.name, record["seconds"],
                             record["precision"])
            bar.update()

        def on_error(job: Job, exc: BaseException) -> None:
            log.error("%s failed: %s: %s", job.name, type(exc).__name__, exc)
            failed = [({**_record(job, item, key, rt), "status": "failed", "error": f"{type(exc).__name__}: {exc}"},
                       item, None, {}, job.entry.spec.kind) for (_, item), key in zip(job.items, job.keys)]
            for (k, _), record in zip(job.items, writer.save_all(failed)):
                records[(k, job.position)] = record
            bar.update()

        if rt.backend == "ray":
            from .backends import ray as ray_backend

            ray_backend.run(plan, jobs, on_done, on_error)
        else:
            executor.run(jobs, lambda job, worker: _compute(plan, job, worker), on_done, on_error)


def _record(job: Job, item: Any, key: str, rt: config_mod.RuntimeConfig, device: torch.device | None = None,
            reason: str | None = None) -> dict[str, Any]:
    """A manifest record of ``job`` on ``item``, before it ran."""
    device = device or job.devices[0]
    return {"method": job.entry.spec.id, "label": job.entry.label, "input": item.name, "status": "ok",
            "seconds": None, "device": str(device), "error": None, "score": None, "shape": None, "files": {},
            "target": None, "predicted": None, "precision": None, "precision_reason": reason,
            "tf32": numerics.tf32_in_effect(rt.tf32, device),
            "warnings": [], "oom_retries": 0, "key": key,
            **({"input_label": item.label} if getattr(item, "label", None) is not None else {})}


def _compute(plan: Plan, job: Job, worker: Worker) -> list[tuple[dict, np.ndarray | None, dict]]:
    """Explain one job's inputs on ``worker`` under its time limit: (record, result, extras) per input.

    The computation runs in a thread of its own (:func:`esegeta.timeouts.call_with_limit`); files
    are written afterwards by the writer, so a stopped job writes nothing."""
    e, device, rt = job.entry, worker.device, plan.config.runtime
    precision = numerics.precision_plan(e.spec, device, rt.amp)
    records = [_record(job, item, key, rt, device, precision.reason) for (_, item), key in zip(job.items, job.keys)]
    x = torch.cat([item.tensor for _, item in job.items]).detach().to(device)
    seed = scheduling.job_seed(rt.seed, e.index, job.items[0][0])
    rng: list[scheduling.JobRandomness] = []
    oom = [0]

    def attempt(name: str, request: Request):
        rng[:] = [scheduling.JobRandomness(seed, e.spec.uses_global_rng)]
        model = worker.replica(x)
        with rng[0], numerics.autocast(name, device), \
                progress.tracked(model, job.name, progress.expected_passes(request, x)):
            return _call(job, model, x, request, plan.base_dir, worker.samples())

    def notify(kind: str, message: str) -> None:
        oom[0] += kind == "oom"
        log.warning("%s: %s", job.name, message)

    def compute():
        attribute_warnings(job.name)
        return RetryPolicy(precision.attempts).run(attempt, e.request, _halved,
                                                   lambda r: bool(torch.isfinite(r[0]).all()), notify)

    start = time.perf_counter()
    try:
        modules = list(worker.replica(x).modules()) if e.timeout_s else []
        done = call_with_limit(compute, e.timeout_s, modules, name=f"esegeta-job-{e.label}")
        return _results(job, worker, x, records, done, precision.reason, time.perf_counter() - start)
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


def _call(job: Job, model, x: torch.Tensor, request: Request, base_dir: Path | None, samples: torch.Tensor):
    """The one call of the method (:func:`esegeta.explainer.run`): (result, scores per input, extras,
    the outcome's facts per input: :func:`_facts`)."""
    outcome = run(request, model, x, base_dir=base_dir, with_scores=True, samples=samples)
    return outcome.result, list(outcome.scores) or [None] * len(job.items), outcome.extras, _facts(outcome, request, x)


def _facts(outcome, request: Request, x: torch.Tensor) -> list[tuple[dict, torch.Tensor | None]]:
    """Per input: the record's resolved ``target`` and ``predicted`` column, and the frozen mask."""
    n = x.shape[0]
    given = None if request.target in (None, "predicted") or not request.spec.needs_target else int(request.target)
    targets = list(outcome.targets) or [given] * n
    predicted = list(outcome.predicted) or [None] * n
    masks = list(outcome.masks) or [None] * n
    return [({"target": t, "predicted": p}, m) for t, p, m in zip(targets, predicted, masks)]


def _halved(request: Request) -> Request | None:
    """The request with the method's internal batch parameter halved, or None (cannot shrink)."""
    smaller = params_mod.halve_batch(request.spec, request.params, request.noise_tunnel)
    return None if smaller is None else request.replace(params=smaller[0], noise_tunnel=smaller[1])


def _results(job: Job, worker: Worker, x: torch.Tensor, records: list[dict], done, reason: str, elapsed: float):
    """Per input: the record completed with the verdict on its result, the result and its extras
    (``x`` is the job's batch on the worker's device)."""
    (attr, scores, extras, facts), request = done.value, done.settings
    params, noise_tunnel = dict(request.params), request.noise_tunnel
    if attr.shape[0] != len(job.items):
        raise RuntimeError(f"the method returned {attr.shape[0]} results for {len(job.items)} inputs")
    seconds = round(elapsed / len(job.items), 4)
    # where the method's axiom (summation to delta, conservation) holds only approximately on this model
    notes = architectures.axiom_notes(job.entry.spec, architectures.network(worker.replica(x)), x[:1])
    computed = []
    for n, ((_, item), record) in enumerate(zip(job.items, records)):
        one = attr[n:n + 1]
        record.update(seconds=seconds, score=scores[n], shape=list(one.shape[1:]), precision=done.precision,
                      oom_retries=done.oom_retries, **facts[n][0])
        if done.fallback:
            record["precision_reason"] = f"{reason}; {done.fallback}"
        problem = verdicts.nonfinite_problem(one, x[n:n + 1], worker.replica(x), scores[n])
        if problem:
            record.update(status="failed", error=problem)
            log.error("%s on %s failed: %s", job.entry.label, item.name, problem)
            computed.append((record, None, {}))
            continue
        record["warnings"] += notes
        flat = verdicts.flat_result_warning(one, params, job.entry.spec.parameters(), scores[n])
        if flat:
            record["warnings"].append(flat)
            log.warning("%s on %s: %s", job.entry.label, item.name, flat)
        if done.oom_retries:
            record["params"] = {**params, **({"noise_tunnel": dict(noise_tunnel)} if noise_tunnel else {})}
        if len(job.items) > 1:
            record["batch"] = len(job.items)
        computed.append((record, one[0].cpu().numpy(), {**_extras_of(extras, n), FROZEN_MASK: facts[n][1]}))
    return computed


def _extras_of(extras: dict[str, Any], n: int) -> dict[str, Any]:
    """Input ``n``'s slice of a batch job's extra outputs (batch axis kept)."""
    def one(value):
        return value[n:n + 1] if torch.is_tensor(value) or isinstance(value, np.ndarray) else value

    return {k: ({kk: one(vv) for kk, vv in v.items()} if isinstance(v, dict) else one(v)) for k, v in extras.items()}


@contextmanager
def _log_file(path: Path):
    """Log to ``path`` (DEBUG and up) for the duration of a run."""
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    previous = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(previous)
        handler.close()
