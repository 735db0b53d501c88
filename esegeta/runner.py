"""The runner: a config's methods over its inputs, with failure isolation and outputs.

``Pipeline(config).validate()`` checks everything a run needs without running a method
(config, files, model load, layer and parameter names, wrapper and target);
``Pipeline(config).run()`` then explains every (input, method) pair. A failing method is
recorded (status, error, traceback in the log) and the others go on; the manifest is
rewritten atomically as jobs finish (at most every :data:`MANIFEST_INTERVAL_S`), and
``--resume`` (:mod:`esegeta.resume`) finishes a run that was killed.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import logging
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, numerics, registry, scheduling, verdicts, wrappers
from . import config as config_mod
from .errors import ConfigError, did_you_mean
from .explainer import check_dims, check_task, find_layer, resolve_target, run_method
from .loading import InputItem, load_inputs, load_model
from .prepare import PreparedModel, prepare, prepared
from .timeouts import TimeLimitExceeded, call_with_limit

log = logging.getLogger("esegeta")
#: Seconds between rewrites of the manifest during a run (a rewrite costs tens of ms on long
#: runs); a run killed meanwhile recomputes at most this much work on ``--resume``.
MANIFEST_INTERVAL_S = 1.0
LIBRARIES = ("torch", "torchvision", "numpy", "captum", "torchray", "grad-cam", "zennit", "shap", "lime",
             "torch-lucent", "torchio", "pydantic", "nibabel", "matplotlib")


def resolve_device(name: str | list[str] | None, where: str = "runtime.devices") -> torch.device:
    """The first of the devices ``name`` stands for (see :func:`esegeta.scheduling.resolve_devices`)."""
    return scheduling.resolve_devices(name, where)[0]


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"esegeta": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass
class RunResult:
    """What a run produced: the manifest (as written), its folder and the exit code."""

    output_dir: Path
    manifest: dict[str, Any]

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.manifest["runs"]

    @property
    def exit_code(self) -> int:
        return 0 if all(r["status"] in ("ok", "skipped") for r in self.runs) else 1

    def result(self, method: str, input_name: str | None = None) -> np.ndarray:
        """The saved ``.npy`` of (method label or id, input) as an array."""
        for r in self.runs:
            if method in (r["label"], r["method"]) and input_name in (None, r["input"]) and "npy" in r["files"]:
                return np.load(self.output_dir / r["files"]["npy"])
        raise KeyError(f"no saved result for {method!r} on {input_name!r}")


@dataclass
class _Validated:
    config: config_mod.Config
    base_dir: Path | None
    model: torch.nn.Module
    inputs: list[InputItem]
    device: torch.device
    prepared: PreparedModel
    methods: list[tuple[int, config_mod.MethodEntry]] = field(default_factory=list)
    devices: list[torch.device] = field(default_factory=list)


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

    # -- validation ---------------------------------------------------------------
    def _selected(self) -> list[tuple[int, config_mod.MethodEntry]]:
        selected = [(i, m) for i, m in enumerate(self.config.methods) if m.enabled]
        if self.only:
            names = {n for m in self.config.methods for n in (m.id, m.name)}
            for wanted in self.only:
                if wanted not in names:
                    raise ConfigError("--only", f"no method with id or label {wanted!r}" + did_you_mean(wanted, names))
            selected = [(i, m) for i, m in enumerate(self.config.methods) if {m.id, m.name} & set(self.only)]
        return selected

    def validate(self) -> _Validated:
        """Everything but running methods: raises ConfigError naming the field at fault."""
        with numerics.fp32_numerics(self.config.runtime.tf32):  # the wrappers' masks come from a forward pass
            return self._validate()

    def _validate(self) -> _Validated:
        cfg = self.config
        config_mod.check_methods(cfg)
        methods = self._selected()
        devices = (scheduling.resolve_devices(self.device_override, "--device") if self.device_override
                   else scheduling.resolve_devices(cfg.runtime.devices))
        device = devices[0]
        model = load_model(cfg.model.model_dump(), self.base_dir)
        inputs = load_inputs(cfg.inputs.model_dump(), self.base_dir)
        first = inputs[0].tensor.to(device)
        try:
            ready = prepared(model, first)
        except Exception as exc:
            raise ConfigError("inputs", f"the model fails on {inputs[0].path.name} (shape "
                                        f"{tuple(inputs[0].tensor.shape)}): {type(exc).__name__}: {exc}") from exc
        for i, entry in methods:
            where = f"methods[{i}]"
            spec = registry.get(entry.id)
            check_task(spec, entry.wrapper or cfg.wrapper, f"{where}.wrapper" if entry.wrapper else "wrapper")
            check_dims(spec, first, f"{where}.id")
            if entry.layer:
                find_layer(ready, entry.layer, f"{where}.layer", spec)
            if entry.device:
                resolve_device(entry.device, f"{where}.device")
            wrapper = entry.wrapper or cfg.wrapper
            target = entry.target if entry.target is not None else cfg.target
            forward = ready
            if wrapper is not None:
                forward = wrappers.build(ready, first, wrapper.model_dump(), self.base_dir)
            if spec.needs_target:
                resolve_target(forward, first, target, f"{where}.target" if entry.target is not None else "target",
                               check=True)
        return _Validated(cfg, self.base_dir, model, inputs, device, ready, methods, devices)

    # -- running ------------------------------------------------------------------
    @property
    def output_dir(self) -> Path:
        if self.output_override is not None:
            return self.output_override
        return ((self.base_dir or Path.cwd()) / self.config.output.dir).resolve()

    def run(self) -> RunResult:
        """Validate, then explain every (input, method) pair; see :class:`RunResult`.

        Jobs run on worker threads (``runtime.devices`` x ``runtime.threads_per_device``, see
        :mod:`esegeta.scheduling`); the manifest lists them in a fixed order (input by input,
        methods in config order) and is rewritten atomically as they finish."""
        from . import outputs, resume

        v = self.validate()
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        with _log_file(out / "esegeta.log"):
            rt = v.config.runtime
            log.info("esegeta %s: %d method(s) x %d input(s) on %s (%d thread(s) each) -> %s", __version__,
                     len(v.methods), len(v.inputs), ", ".join(map(str, v.devices)), rt.threads_per_device, out)
            for change in v.prepared.changes:
                log.info("prepared copy: %s", change)
            for item in v.inputs:
                if not torch.isfinite(item.tensor).all():
                    log.warning("input %s holds non-finite values (NaN or Inf): its results will fail", item.name)
            previous = {}
            if self.resume:
                resume.clean_stale_tmp(out)
                previous = resume.load_previous(out)
            manifest = {
                "esegeta": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "libraries": library_versions(),
                "config": v.config.model_dump(mode="json", by_alias=True, exclude_none=True),
                "config_dir": str(v.base_dir),
                "device": str(v.device),
                "devices": [str(d) for d in v.devices],
                "prepared_model": v.prepared.changes,
                "inputs": [{"name": item.name, "path": str(item.path), "shape": list(item.tensor.shape[1:])}
                           for item in v.inputs],
                "runs": [],
            }
            records, jobs = self._plan(v, previous)
            if previous:
                log.info("resume: %d result(s) kept from the earlier run, %d to compute",
                         len(records), sum(len(j.items) for j in jobs))
            lock = threading.Lock()
            written = [0.0]
            from tqdm import tqdm

            with tqdm(total=len(jobs), desc="esegeta", unit="job", disable=None) as bar:
                def done(job: _Job, results: list[dict[str, Any]]) -> None:
                    with lock:
                        for (k, _), record in zip(job.items, results):
                            records[(k, job.position)] = record
                        if time.monotonic() - written[0] >= MANIFEST_INTERVAL_S:
                            manifest["runs"] = [records[key] for key in sorted(records)]
                            outputs.save_json(out / "manifest.json", manifest)
                            written[0] = time.monotonic()
                        bar.update()

                self._execute(v, jobs, out, done)
            manifest["runs"] = [records[key] for key in sorted(records)]
            self._overview(v, manifest, out)
            outputs.save_json(out / "manifest.json", manifest)
            failed = [r for r in manifest["runs"] if r["status"] != "ok"]
            log.info("done: %d ok, %d failed", len(manifest["runs"]) - len(failed), len(failed))
        return RunResult(out, manifest)

    def _plan(self, v: _Validated, previous: dict) -> tuple[dict[tuple[int, int], dict], list[_Job]]:
        """Records kept from an earlier run (``--resume``), and the jobs left: one per (method,
        input), or per ``runtime.batch_size`` inputs of one shape for a method without wrapper."""
        from . import resume

        cfg = v.config
        model_hash = resume.model_digest(v.model)
        input_hashes = [resume.tensor_digest([item.tensor]) for item in v.inputs]
        first = v.inputs[0].tensor.shape
        samples_hash = resume.tensor_digest([i.tensor for i in v.inputs if i.tensor.shape == first])
        devices = v.devices
        records: dict[tuple[int, int], dict] = {}
        jobs: list[_Job] = []
        for position, (i, entry) in enumerate(v.methods):
            spec = registry.get(entry.id)
            settings = self._settings(entry)
            settings["samples"] = None if resume.ignores_samples(entry.id) else samples_hash
            job_devices = [resolve_device(entry.device, f"methods[{i}].device")] if entry.device else devices
            todo: list[tuple[int, InputItem, str]] = []
            for k, item in enumerate(v.inputs):
                key = resume.job_key(settings, model_hash, input_hashes[k])
                kept = resume.reusable(previous, entry.name, item.name, key)
                if kept is not None:
                    records[(k, position)] = {**kept, "resumed": True}
                else:
                    todo.append((k, item, key))
            batch = cfg.runtime.batch_size if (settings["wrapper"] is None and settings["patch"] is None
                                               and spec.kind in BATCHABLE_KINDS) else 1
            while todo:
                shape = todo[0][1].tensor.shape
                group = [t for t in todo if t[1].tensor.shape == shape][:batch]
                taken = {k for k, _, _ in group}
                todo = [t for t in todo if t[0] not in taken]
                jobs.append(_Job(position, i, entry, [(k, item) for k, item, _ in group],
                                 [key for _, _, key in group], job_devices))
        jobs.sort(key=lambda j: (j.items[0][0], j.position))
        return records, jobs

    def _settings(self, entry: config_mod.MethodEntry) -> dict[str, Any]:
        """What decides a method's numbers on an input (the resume key, besides model and input)."""
        cfg = self.config
        patch = entry.patch or cfg.patch
        wrapper = entry.wrapper or cfg.wrapper
        return {
            "id": entry.id, "label": entry.name, "params": entry.params, "layer": entry.layer,
            "noise_tunnel": entry.noise_tunnel, "wrapper": wrapper.model_dump(mode="json") if wrapper else None,
            "target": entry.target if entry.target is not None else cfg.target,
            "patch": patch.model_dump(mode="json") if patch else None,
            "model": cfg.model.model_dump(mode="json"), "inputs": cfg.inputs.model_dump(mode="json", exclude={"paths"}),
            "seed": cfg.runtime.seed, "amp": cfg.runtime.amp, "tf32": cfg.runtime.tf32, "batch_size": cfg.runtime.batch_size,
            "output": cfg.output.model_dump(mode="json", exclude={"dir"}),
        }

    def _execute(self, v: _Validated, jobs: list[_Job], out: Path, done) -> None:
        """Run ``jobs`` on the workers; ``done(job, records)`` is called as each finishes."""
        per_device = v.config.runtime.threads_per_device
        devices = list(dict.fromkeys([*v.devices, *(d for j in jobs for d in j.devices)]))
        workers = [_Worker(d, v.prepared if d == v.device and n == 0 else None) for d in devices
                   for n in range(per_device) if any(d in j.devices for j in jobs)]
        pending = list(jobs)
        lock = threading.Lock()

        def take(worker: _Worker) -> _Job | None:
            with lock:
                job = next((j for j in pending if worker.device in j.devices), None)
                if job is not None:
                    pending.remove(job)
                return job

        def loop(worker: _Worker) -> None:
            while (job := take(worker)) is not None:
                done(job, self._job(v, job, worker, out))

        cpu_workers = sum(w.device.type == "cpu" for w in workers)
        with scheduling.intra_op_threads(cpu_workers), numerics.fp32_numerics(v.config.runtime.tf32), _job_warnings():
            threads = [threading.Thread(target=loop, args=(w,), name=f"esegeta-worker-{n}", daemon=True)
                       for n, w in enumerate(workers)]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.5)

    def _job(self, v: _Validated, job: _Job, worker: _Worker, out: Path) -> list[dict[str, Any]]:
        """Explain one job's inputs with its method on ``worker``; one manifest record per input.

        The computation runs in a thread of its own under the time limit; files are written
        afterwards by the worker, so a stopped job writes nothing."""
        from . import outputs

        cfg, entry, device = v.config, job.entry, worker.device
        spec = registry.get(entry.id)
        rt = cfg.runtime
        names = ", ".join(item.name for _, item in job.items)
        plan = numerics.precision_plan(spec, device, rt.amp)
        records = [{"method": entry.id, "label": entry.name, "input": item.name, "status": "ok", "seconds": None,
                    "device": str(device), "error": None, "score": None, "shape": None, "files": {},
                    "precision": None, "precision_reason": plan.reason,
                    "tf32": numerics.tf32_in_effect(rt.tf32, device), "warnings": [], "oom_retries": 0, "key": key}
                   for (_, item), key in zip(job.items, job.keys)]
        wrapper = entry.wrapper or cfg.wrapper
        patch = entry.patch or cfg.patch
        target = entry.target if entry.target is not None else cfg.target
        limit = entry.timeout_s or rt.timeout_s
        seed = scheduling.job_seed(rt.seed, job.method_index, job.items[0][0])
        params = dict(entry.params)
        noise_tunnel = dict(entry.noise_tunnel) if entry.noise_tunnel is not None else None
        precisions = plan.attempts
        state: dict[str, Any] = {"oom_retries": 0, "rng": None, "fallback": None}
        start = time.perf_counter()

        def attempt(precision: str, x: torch.Tensor, model: PreparedModel, samples: torch.Tensor):
            extras: dict[str, Any] = {}
            state["rng"] = rng = scheduling.JobRandomness(seed, scheduling.uses_global_rng(entry.id))
            with rng, numerics.autocast(precision, device):
                attr, score = run_method(spec, model, x, target=target,
                                         wrapper=wrapper.model_dump() if wrapper else None, layer=entry.layer,
                                         params=params, noise_tunnel=noise_tunnel, base_dir=v.base_dir,
                                         with_score=len(job.items) == 1, samples=samples, extras=extras,
                                         patch=(patch.model_dump() if patch else None))
                scores = [score] if len(job.items) == 1 else _batch_scores(model, x, target, spec.needs_target)
            return attr, scores, extras

        def compute():
            _current_job.label = f"{entry.name} on {names}"
            x = torch.cat([item.tensor for _, item in job.items]).detach().to(device)
            model, samples = worker.replica(v, x), worker.samples(v)
            for n, precision in enumerate(precisions):
                last = n == len(precisions) - 1
                while True:
                    try:
                        attr, scores, extras = attempt(precision, x, model, samples)
                    except Exception as exc:
                        if scheduling.is_out_of_memory(exc) and scheduling.halve_batch(spec, params, noise_tunnel):
                            scheduling.free_memory(device)
                            state["oom_retries"] += 1
                            log.warning("%s on %s: out of memory; retrying with a smaller batch (%s)", entry.name,
                                        names, _batch_params(params, noise_tunnel))
                            continue
                        if last:
                            raise
                        log.warning("%s on %s failed under %s (%s: %s): recomputing in fp32", entry.name, names,
                                    precision, type(exc).__name__, exc)
                        state["fallback"] = f"failed in {precision} ({type(exc).__name__}: {exc}): recomputed in fp32"
                        break
                    if last or torch.isfinite(attr).all():
                        return attr, scores, extras, precision
                    log.warning("%s on %s: non-finite result under %s: recomputing in fp32", entry.name, names,
                                precision)
                    state["fallback"] = f"non-finite result in {precision}: recomputed in fp32"
                    break

        try:
            modules = list(worker.replica(v, job.items[0][1].tensor.to(device)).modules()) if limit else []
            attr, scores, extras, precision = call_with_limit(compute, limit, modules,
                                                              name=f"esegeta-job-{entry.name}")
            if attr.shape[0] != len(job.items):
                raise RuntimeError(f"the method returned {attr.shape[0]} results for {len(job.items)} inputs")
            seconds = round((time.perf_counter() - start) / len(job.items), 4)
            for n, ((_, item), record) in enumerate(zip(job.items, records)):
                one = attr[n:n + 1]
                record.update(seconds=seconds, score=scores[n], shape=list(one.shape[1:]), precision=precision,
                              oom_retries=state["oom_retries"])
                if state["fallback"]:
                    record["precision_reason"] = f"{plan.reason}; {state['fallback']}"
                x_one = item.tensor.to(device)
                problem = verdicts.nonfinite_problem(one, x_one, worker.replica(v, x_one), scores[n])
                if problem:
                    record.update(status="failed", error=problem)
                    log.error("%s on %s failed: %s", entry.name, item.name, problem)
                    continue
                flat = verdicts.flat_result_warning(one, params, spec.adapter.parameters(spec), scores[n])
                if flat:
                    record["warnings"].append(flat)
                    log.warning("%s on %s: %s", entry.name, item.name, flat)
                if state["oom_retries"]:
                    record["params"] = {**params, **({"noise_tunnel": noise_tunnel} if noise_tunnel else {})}
                if len(job.items) > 1:
                    record["batch"] = len(job.items)
                record["files"] = outputs.save_result(out, item, entry.name, one[0].cpu().numpy(), cfg.output,
                                                      spec.kind)
                record["files"].update(outputs.save_extras(out, item, entry.name, _extras_of(extras, n)))
                log.info("%s on %s: ok in %.2fs (%s)", entry.name, item.name, seconds, precision)
        except TimeLimitExceeded as exc:
            worker.discard()  # upstream state may be left on the copy it ran on
            if state["rng"] is not None:
                state["rng"].release()  # the job may have been stopped before its own release
            for record in records:
                record.update(status="timeout", seconds=round(time.perf_counter() - start, 4),
                              error=f"timeout: {exc}", files={}, oom_retries=state["oom_retries"])
            log.error("%s on %s: %s", entry.name, names, exc)
        except Exception as exc:  # noqa: BLE001 (isolation: one failing method never stops the others)
            for record in records:
                record.update(status="failed", seconds=round(time.perf_counter() - start, 4),
                              error=f"{type(exc).__name__}: {exc}", files={}, oom_retries=state["oom_retries"])
            log.error("%s on %s failed: %s", entry.name, names, records[0]["error"])
            log.debug("traceback of %s on %s:\n%s", entry.name, names,
                      "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return records

    def _overview(self, v: _Validated, manifest: dict[str, Any], out: Path) -> None:
        from . import figures, outputs

        if "png" not in v.config.output.formats:
            return
        rows = []
        for item in v.inputs:
            cells = []
            for r in (r for r in manifest["runs"] if r["input"] == item.name):
                kind = registry.get(r["method"]).kind
                attr = np.load(out / r["files"]["npy"]) if r["status"] == "ok" and "npy" in r["files"] else None
                if attr is not None and kind != "image":  # saved in the input's own axis order
                    attr = item.model_order(attr)
                note = "" if attr is not None else f"{r['status']}: {(r['error'] or '')[:60]}"
                cells.append((r["label"], attr, note, "image" if kind == "image" else "attribution"))
            rows.append((item.name, item.tensor[0].detach().cpu().numpy(), cells))
        fig_cfg = v.config.output.figure
        try:
            fig = figures.overview_figure(rows, method=fig_cfg.method, sign=fig_cfg.sign, projection=fig_cfg.projection)
            outputs.save_figure(fig, out / "overview.png")
            manifest["overview"] = "overview.png"
        except Exception as exc:  # noqa: BLE001 (a failed overview figure loses no result)
            log.error("overview figure failed: %s: %s", type(exc).__name__, exc)
            log.debug("%s", traceback.format_exc())


def _samples(inputs: list[InputItem], device: torch.device) -> torch.Tensor:
    """The run's inputs as one batch (those shaped like the first), for methods that fit on data."""
    shape = inputs[0].tensor.shape
    return torch.cat([i.tensor for i in inputs if i.tensor.shape == shape]).to(device)


#: Kinds whose result has one row per input, so inputs of one shape can share an upstream call.
BATCHABLE_KINDS = ("attribution", "layer", "neuron")


@dataclass
class _Job:
    """One method on one input, or on a batch of same-shaped inputs (``runtime.batch_size``)."""

    position: int  # the method's place among the selected methods (manifest order)
    method_index: int  # its index in the config's methods (seeds)
    entry: config_mod.MethodEntry
    items: list[tuple[int, InputItem]]  # (input index, input)
    keys: list[str]  # resume key per input
    devices: list[torch.device]  # where it may run


class _Worker:
    """A worker thread's device and its own prepared replica of the model."""

    def __init__(self, device: torch.device, replica: PreparedModel | None = None):
        self.device = device
        self._replica = replica
        self._samples: torch.Tensor | None = None

    def replica(self, v: _Validated, x: torch.Tensor) -> PreparedModel:
        if self._replica is None:
            self._replica = prepare(v.model, x[:1].to(self.device))
        return self._replica

    def samples(self, v: _Validated) -> torch.Tensor:
        if self._samples is None:
            self._samples = _samples(v.inputs, self.device)
        return self._samples

    def discard(self) -> None:
        """Forget the replica (after a timeout): the next job gets a fresh copy."""
        self._replica = None


def _batch_scores(model: torch.nn.Module, x: torch.Tensor, target: Any, needs_target: bool) -> list[float | None]:
    """The explained value of every input of a batch (plain model, no wrapper)."""
    if not needs_target or target is None:
        return [None] * x.shape[0]
    with torch.no_grad():
        scores = model(x)
    index = scores.argmax(dim=1) if target == "predicted" else torch.full((x.shape[0],), int(target),
                                                                         device=scores.device)
    return [float(scores[n, int(index[n])]) for n in range(x.shape[0])]


def _extras_of(extras: dict[str, Any], n: int) -> dict[str, Any]:
    """Input ``n``'s slice of a batch job's extra outputs (batch axis kept)."""
    def one(value):
        return value[n:n + 1] if torch.is_tensor(value) or isinstance(value, np.ndarray) else value

    return {k: ({kk: one(vv) for kk, vv in v.items()} if isinstance(v, dict) else one(v)) for k, v in extras.items()}


def _batch_params(params: dict[str, Any], noise_tunnel: dict[str, Any] | None) -> str:
    both = {**params, **(noise_tunnel or {})}
    return ", ".join(f"{k}={both[k]}" for k in scheduling.BATCH_PARAMS if k in both)


_current_job = threading.local()


@contextmanager
def _job_warnings():
    """Log each job's warnings (once per job and message) at debug level.

    ``warnings.catch_warnings`` is process-wide, so it is entered once around all workers and
    warnings are attributed to the job running in the thread that raised them."""
    seen: set[tuple[str, str]] = set()
    seen_lock = threading.Lock()

    def show(message, category, filename, lineno, file=None, line=None):
        label = getattr(_current_job, "label", "esegeta")
        first = str(message).split("\n")[0]
        with seen_lock:
            if (label, first) in seen:
                return
            seen.add((label, first))
        log.debug("%s: warning: %s", label, first)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


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
