"""The runner: a config's methods over its inputs, with failure isolation and outputs.

``Pipeline(config).validate()`` checks everything a run needs without running a method
(:mod:`esegeta.run.plan`); ``Pipeline(config).run()`` then explains every (input, method) pair on
the workers of :mod:`esegeta.run.executor`, and :mod:`esegeta.run.writer` writes each result, its record
(durable before it is logged ok) and at the end the manifest and the overview. A failing method,
or a failing write, is recorded (status, error, traceback in the log) and the others go on;
``--resume`` finishes a run that was killed, recomputing nothing finished.
"""
from __future__ import annotations

import datetime
import json
import importlib.metadata
import platform
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esegeta.errors import ConfigError
from esegeta.version import __version__
from esegeta.attribution import numerics, scheduling
from esegeta.run import plan as planning
from esegeta.spec import registry
from esegeta.spec import config as config_mod
from esegeta.run import job as job_mod
from esegeta.run.executor import Executor
from esegeta.run import memory
from esegeta.run.memory import Releaser, Trimmer
from esegeta.run.plan import Job, Plan
from esegeta.run.records import InputEntries, Records
from esegeta.run.writer import Writer, check_dir, output_folder
from esegeta.run.backends import ray as ray_backend
from esegeta.evaluation import engine
from esegeta.evaluation.engine import Evaluation, check
from esegeta.run.evaluate import after_run, evaluate_plan, mask_problems
from esegeta.show.report import notebook_summary, update_evaluation

log = logging.getLogger("esegeta")
#: Distributions every run depends on; the explainer libraries' come from their adapters' records.
CORE_DISTRIBUTIONS = ("torch", "torchvision", "numpy", "torchio", "pydantic", "nibabel", "matplotlib")


def resolve_device(name: str | list[str] | None, where: str = "runtime.devices") -> torch.device:
    """The first of the devices ``name`` stands for (see :func:`esegeta.attribution.scheduling.resolve_devices`)."""
    return scheduling.resolve_devices(name, where)[0]


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"esegeta": __version__, "python": platform.python_version()}
    for name in (*CORE_DISTRIBUTIONS, *registry.distributions()):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass
class RunResult:
    """What a run produced: the manifest (as written, or as it would have been if writing it
    failed), its folder, what failed besides the methods (``error``: the manifest, the
    evaluation) and the exit code.

    ``streamed`` is the manifest as the run holds it: its ``runs`` and ``inputs`` are read from disk
    as they are used (:mod:`esegeta.run.records`), so that memory stays flat in the number of inputs;
    :attr:`runs` is that sequence, :attr:`manifest` a plain dict of lists (made on first use)."""
    output_dir: Path
    streamed: dict[str, Any]
    error: str | None = None

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, (Records, InputEntries)) else v for k, v in self.streamed.items()}

    @property
    def runs(self) -> Records:
        """The records, input by input (methods in config order), each read from disk as it is used."""
        return self.streamed["runs"]

    @property
    def exit_code(self) -> int:
        ok = self.runs.with_status("ok") + self.runs.with_status("skipped")
        return 0 if self.error is None and ok == len(self.runs) else 1

    def _repr_html_(self) -> str:
        """In Jupyter: the counts, the methods' table and the overview inline (no pyplot involved)."""
        return notebook_summary(self.streamed, self.output_dir)

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

            check(self.config, self.base_dir)
        with numerics.fp32_numerics(self.config.runtime.tf32):  # the wrappers' masks come from a forward pass
            plan = planning.plan(self.config, self.base_dir, only=self.only, device=self.device_override)
        plan.problems += mask_problems(plan)
        plan.raise_problems()
        if self.config.runtime.backend == "ray":  # an address where no cluster answers: refused in seconds
            ray_backend.check_address(self.config.runtime.ray_address)
            if self.config.runtime.ray_address:  # what cannot reach the cluster's workers: refused here too
                ray_backend.shipment(plan, dry=True)
        check_dir(self.output_dir, self._output_field, create=False)  # what run refuses, validate refuses
        return plan

    @property
    def output_dir(self) -> Path:
        return output_folder(self.config.output.dir, self.base_dir, self.output_override)

    @property
    def _output_field(self) -> str:
        """What names the output folder: ``--output`` (``output_dir=``) when given, else the config's key."""
        return "output.dir" if self.output_override is None else "--output"

    def run(self) -> RunResult:
        """Validate, then explain every (input, method) pair; see :class:`RunResult`.

        The manifest lists the results in a fixed order (input by input, methods in config order)."""
        plan = self.validate()
        out = check_dir(self.output_dir, self._output_field)
        with Writer(out, plan.config.output, resume=self.resume) as writer, _log_file(out / "esegeta.log"):
            _log_start(plan, out)
            kept, jobs = planning.jobs(plan, writer.previous())
            if self.resume:
                log.info("resume: %d result(s) kept from the earlier run, %d to compute", len(kept), jobs.results)
            writer.begin(list(kept.values()), plan.inputs)
            records = Records(len(plan.inputs), len(plan.entries))  # on disk: memory flat in the inputs
            for key, record in kept.items():
                records.put(key, record)
            resumed, kept = len(kept), None
            try:
                _execute(plan, jobs, writer, records)
            except KeyboardInterrupt:  # SIGINT/SIGTERM: what finished is journaled; --resume goes on
                done = records.with_status("ok") - resumed
                log.warning("interrupted: %d result(s) of this run are journaled in %s; `esegeta run --resume` "
                            "computes the rest", done, out / ".esegeta-journal.jsonl")
                raise
            manifest = {**_head(plan), "runs": records}
            error = None
            memory.trim()  # the jobs' freed pages back before the end's report and manifest
            try:
                writer.finish(manifest, plan.inputs, {e.spec.id: e.spec.kind for e in plan.entries})
            except Exception as exc:  # noqa: BLE001 (every result is in the journal: --resume completes it)
                error = f"writing the manifest failed: {type(exc).__name__}: {exc}"
                log.error("%s; the results are recorded in %s (esegeta run --resume writes it)", error,
                          out / ".esegeta-journal.jsonl")
            if error is None and plan.config.evaluation is not None:
                error = after_run(plan, out, manifest, writer.token)
                if "report" in manifest:  # the report was written before the evaluation: add its section
                    try:
                        update_evaluation(out)
                    except OSError as exc:  # e.g. a full disk: the evaluation is in manifest.json
                        error = f"updating report.html with the evaluation failed: {type(exc).__name__}: {exc}"
                        log.error("%s", error)
            ok = records.with_status("ok")
            log.info("done: %d ok, %d failed", ok, len(records) - ok)
        return RunResult(out, manifest, error)


def _log_start(plan: Plan, out: Path) -> None:
    rt = plan.config.runtime
    log.info("esegeta %s: %d method(s) x %d input(s) on %s (%d thread(s) each) -> %s", __version__,
             len(plan.entries), len(plan.inputs), ", ".join(map(str, plan.devices)), rt.threads_per_device, out)
    for line in plan.ready.summary():
        log.info("prepared copy: %s", line)
    for change in plan.ready.changes:
        log.debug("prepared copy: %s", change)
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
        "inputs": InputEntries(plan.inputs),
    }


def _execute(plan: Plan, jobs: planning.Jobs, writer: Writer, records: Records) -> None:
    """Compute ``jobs`` on the workers; each result is written and recorded as its job ends."""
    from tqdm import tqdm

    rt = plan.config.runtime
    executor = Executor(plan.devices, rt.threads_per_device, plan.model, plan.inputs, plan.ready, rt.tf32)
    # memory flat in the number of inputs (esegeta.run.memory): finished inputs leave the cache, freed heap pages go
    trimmer, releaser = Trimmer(), Releaser()
    with tqdm(total=len(jobs), desc="esegeta", unit="job", disable=None) as bar:
        def on_done(job: Job, computed: list[tuple[dict, np.ndarray | None, dict]]) -> None:
            saved = writer.save_all([(record, item, result, extras, job.entry.spec.kind)
                                     for (_, item), (record, result, extras) in zip(job.items, computed)])
            for (k, item), record in zip(job.items, saved):
                records.put((k, job.position), record)
                if record["status"] == "ok":
                    log.info("%s on %s: ok in %.2fs (%s)", job.entry.label, item.name, record["seconds"],
                             record["precision"])
            bar.update()
            releaser.done(job)
            trimmer.done()

        def on_error(job: Job, exc: BaseException) -> None:
            log.error("%s failed: %s: %s", job.name, type(exc).__name__, exc)
            failed = [({**job_mod.record(job, item, key, rt), "status": "failed", "error": f"{type(exc).__name__}: {exc}"},
                       item, None, {}, job.entry.spec.kind) for (_, item), key in zip(job.items, job.keys)]
            for (k, _), record in zip(job.items, writer.save_all(failed)):
                records.put((k, job.position), record)
            bar.update()
            releaser.done(job)
            trimmer.done()

        if rt.backend == "ray":  # Ray Data takes the jobs as one list of rows
            ray_backend.run(plan, list(releaser.watch(jobs)), on_done, on_error)
        else:
            executor.run(releaser.watch(jobs), lambda job, worker: job_mod.compute(plan, job, worker), on_done,
                         on_error, jobs.devices)


class _LogFile(logging.FileHandler):
    """``esegeta.log``: a write that fails (a full disk) is said once on stderr, not as a
    ``--- Logging error ---`` block with a traceback for every message."""
    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            print(f"esegeta: cannot write {self.baseFilename}: {error}; the log goes on on the console only",
                  file=sys.stderr)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # its last flush, on a full disk
            pass


@contextmanager
def _log_file(path: Path):
    """Log to ``path`` (DEBUG and up) for the duration of a run."""
    handler = _LogFile(path, mode="a", encoding="utf-8")
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


def evaluate_run(config: str | Path | dict, *, output_dir: str | Path | None = None, device: str | None = None,
                 base_dir: str | Path | None = None) -> dict[str, Any]:
    """``esegeta evaluate``: the ``evaluation`` block on a finished run's saved attributions
    (nothing recomputed); returns the manifest's ``evaluation`` section and ``output_dir``."""
    pipeline = Pipeline(config, output_dir=output_dir, device=device, base_dir=base_dir)
    if pipeline.config.evaluation is None:
        raise ConfigError("evaluation", "the config has no evaluation block: add one, e.g. "
                                        '"evaluation": {"metrics": ["deletion", "sparseness"]}')
    plan = pipeline.validate()
    out = pipeline.output_dir
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError("output.dir", f"{out} holds no manifest.json: run `esegeta run` on the config first")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    with Writer(out, plan.config.output) as writer:
        section = {**evaluate_plan(plan, out, manifest, writer.token), "output_dir": str(out)}
    if (out / "report.html").is_file():  # the run's report gains (or renews) its evaluation section
        update_evaluation(out)
    return section




def evaluate(model, inputs=None, attributions=None, metrics=None, **options: Any) -> Evaluation | dict[str, Any]:
    """``esegeta.evaluate``: on tensors, :func:`esegeta.evaluation.engine.evaluate` (its arguments);
    on a config (``model`` a path or dict, nothing else), ``esegeta evaluate CONFIG``: returns the
    manifest's ``evaluation`` section."""
    if isinstance(model, (str, Path, dict)):
        return evaluate_run(model, output_dir=options.get("output_dir"))
    return engine.evaluate(model, inputs, attributions, metrics, **options)
