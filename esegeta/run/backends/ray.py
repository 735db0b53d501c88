"""``runtime.backend: "ray"``: a run's jobs on a Ray cluster, through Ray Data.

The jobs (one method on one input, or on a batch of same-shaped inputs) become the rows of a
Ray dataset, repartitioned so that every actor gets work; ``map_batches`` sends them to a pool
of actors (:class:`Explainer`), each of which builds its own model and prepared replica from
the config (never in the driver, which would hold a second copy: the driver checks the config
on the CPU and holds no GPU memory; on CUDA one GPU per actor, with ``batch_size`` given
explicitly as Ray requires), computes exactly what a local worker
computes (:func:`esegeta.run.job.compute`: same seeds, same retry policy, same verdicts) and
returns the results. The driver streams them back and hands each to the run's writer, the
output folder's one owner: outputs, manifest and ``--resume`` are those of a local run.

Actors: one per GPU of the cluster when ``runtime.devices`` names CUDA, else
``runtime.threads_per_device``, each using its share of the cluster's CPUs. They end, and
release their memory (CUDA caches emptied after each job), when the dataset is consumed.
``runtime.ray_address`` joins a running cluster (``"auto"``, ``"host:6379"``, ``"ray://host:10001"``),
whose nodes need not share this machine's files: the actors get them through Ray's ``runtime_env``
(:func:`shipment`): this process's ``esegeta`` package (``py_modules``: the workers run the
driver's code, not whatever version a node has installed) and a working directory holding the
model file (with the ``.py`` files beside it), the weights, custom wrapper and dataset files, every
input file, the files methods' params name (PatternNet's ``fit_inputs``, a background file: a folder or
glob becomes the list of its files) and the summaries' label map and names, the actors' config
rewritten to point into it; ``validate`` counts them too (nothing copied). Files past
:data:`SHIP_LIMIT_BYTES` refuse the run before anything is computed, naming them (give such
inputs through ``inputs.dataset``, reading storage every node mounts). The nodes must have the
same Python libraries installed (torch, the explainers). Without ``ray_address`` a local cluster
is started for the run and shut down after it. A cluster already initialised in this process is
used as it is.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from esegeta.errors import ConfigError
from esegeta.spec import config as config_mod
from esegeta.io import datasets
from esegeta.run.executor import Worker
from esegeta.io.loading import expand_paths, load_model, resolve as resolve_path
from esegeta.run.plan import Plan
from esegeta.attribution.prepare import prepared
from esegeta.spec.config import resolve
from esegeta.attribution import numerics, summaries
from esegeta.run.executor import _job_warnings
from esegeta.run.plan import Job
from esegeta.run.job import compute

log = logging.getLogger("esegeta")


class Explainer:
    """A Ray actor: one model replica; ``__call__`` computes a batch of jobs (rows)."""

    def __init__(self, config: dict, base_dir: str | None, indices: list[int], device: str, threads: int):
        import torch


        torch.set_num_threads(max(1, threads))
        cfg = config_mod.parse(config)
        base = Path(base_dir).resolve() if base_dir else None  # ".": the shipped working directory
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device(device)
        model = load_model(cfg.model, base)
        inputs = datasets.refs(datasets.source(cfg.inputs, base, cfg.model))
        ready = prepared(model, inputs[0].tensor.to(self.device))
        entries = [resolve(cfg.methods[i], cfg, i) for i in indices]
        self.plan = Plan(cfg, base, model, inputs, [self.device], ready, entries,
                         summaries=summaries.setting(cfg.output.summaries, cfg.inputs, base))
        self.worker = Worker(self.device, model, inputs, ready)
        self._held: list = []  # the last job's inputs, in the inputs' cache: the next job is often on them

    def _release(self, items: list) -> None:
        """Drop from the inputs' cache those of the last job that the one now does not use: an actor
        holds one job's inputs, never the run's (jobs come input by input; the local runner's
        :class:`esegeta.run.memory.Releaser` does the same from its count of each input's jobs)."""
        for item in self._held:
            if not any(item is other for other in items):
                item.release()
        self._held = items

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch


        payloads = []
        for text in batch["job"]:
            spec = json.loads(str(text))
            for k, label in zip(spec["inputs"], spec["labels"]):  # the driver's scan read them
                self.plan.inputs[k].label = label
            job = Job(spec["position"], self.plan.entries[spec["position"]],
                      [(k, self.plan.inputs[k]) for k in spec["inputs"]], spec["keys"], [self.device])
            self._release([item for _, item in job.items])
            try:
                with numerics.fp32_numerics(self.plan.config.runtime.tf32), _job_warnings():
                    payloads.append(pickle.dumps(("done", compute(self.plan, job, self.worker))))
            except Exception as exc:  # noqa: BLE001 (recorded failed by the driver, as a local worker does)
                payloads.append(pickle.dumps(("error", f"{type(exc).__name__}: {exc}")))
            finally:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return {"id": np.asarray(batch["id"]), "payload": np.array(payloads, dtype=object)}


def _actors(devices: list, threads_per_device: int) -> tuple[int, int, str]:
    """(actors, GPUs per actor, device name in an actor)."""
    import ray

    if any(d.type == "cuda" for d in devices):
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus:
            return gpus, 1, "cuda"
        log.warning("ray: the cluster has no GPU: the actors run on its CPUs")
    return max(1, threads_per_device), 0, "cpu"


#: Seconds a ``runtime.ray_address`` is given to answer before the run is refused.
CONNECT_TIMEOUT_S = 3.0


def check_address(address: str | None, where: str = "runtime.ray_address") -> None:
    """ConfigError naming ``where`` unless ``address`` reaches a Ray cluster: ``host:port`` and
    ``ray://host:port`` must accept a TCP connection within :data:`CONNECT_TIMEOUT_S`; ``"auto"`` needs
    a running local cluster (``RAY_ADDRESS``, or the file Ray's head node writes). Without this,
    ``ray.init`` waits minutes on an address where nothing listens, or ends in a traceback."""
    import socket

    if not address:
        return
    text = address
    if text == "auto":
        text = os.environ.get("RAY_ADDRESS", "")
        current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        if not text and current.is_file():
            text = current.read_text(encoding="utf-8", errors="replace").strip()
        if not text:
            raise ConfigError(where, "'auto' finds no running Ray cluster on this machine (no RAY_ADDRESS, no "
                                     "`ray start --head`): start one, give its address, or remove ray_address to "
                                     "let esegeta start a local cluster")
    host, sep, port = text.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(where, f"{address!r} is not a Ray address: write 'host:port', 'ray://host:10001' or 'auto'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError, OverflowError) as exc:
        raise ConfigError(where, f"no Ray cluster answers at {text} ({exc.strerror or exc} within "
                                 f"{CONNECT_TIMEOUT_S:g} s): start it (`ray start --head`) or fix the address"
                          ) from None


#: Bytes of files :func:`shipment` sends to a cluster's workers at most (Ray carries a working
#: directory in one gRPC message, 512 MiB by default; half of it leaves room for the zip).
SHIP_LIMIT_BYTES = 256 * 2**20

#: The esegeta package of this process (shipped to the workers as a ``py_module``).
PACKAGE = Path(__file__).resolve().parents[2]


class _Shipment:
    """The files of a run gathered in ``folder`` (the actors' working directory), with the size so far."""

    def __init__(self, base: Path | None, dry: bool = False):
        self.base, self.dry = base, dry  # dry: sizes counted, nothing copied (validate)
        self.folder = Path(tempfile.mkdtemp(prefix="esegeta-ray-")) if not dry else Path("shipped")
        self.size = 0
        self.files: list[tuple[int, str, Path]] = []  # (bytes, field, path): the largest are named on refusal

    def data(self, path: str | Path, field: str, where: str) -> str:
        """Copy the file ``path`` (as the config gives it) to ``where/<its name>``; its new relative path."""
        source = resolve_path(path, self.base)
        target = self.folder / where / source.name
        if self.dry:
            size = source.stat().st_size
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            size = target.stat().st_size
        self.size += size
        self.files.append((size, field, source))
        return target.relative_to(self.folder).as_posix()

    def code(self, ref: str, field: str, where: str) -> str:
        """``file.py:callable`` → the file and the ``.py`` files beside it (its imports) copied to
        ``where``; ``module:callable`` is left as it is (importable on the workers or not)."""
        module, sep, name = ref.rpartition(":")
        if not sep or not module.lower().endswith(".py"):
            return ref
        source = resolve_path(module, self.base)
        for sibling in sorted(source.parent.glob("*.py")):
            if sibling != source:
                self.data(sibling, field, where)
        return f"{self.data(source, field, where)}:{name}"

    def params(self, value: Any, field: str, where: str) -> Any:
        """A method's parameter with every file it names shipped (PatternNet's ``fit_inputs``, a baseline
        or background file...): a string naming an existing file becomes its shipped path; a folder or a
        glob that names files, the list of their shipped paths (what ``fit_inputs`` and backgrounds take);
        any other string (``"samples"``, ``"blur"``) stays as it is, in lists and dicts alike."""
        if isinstance(value, dict):
            return {k: self.params(v, f"{field}.{k}", f"{where}/{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.params(v, f"{field}[{i}]", f"{where}/{i}") for i, v in enumerate(value)]
        if not isinstance(value, str) or not value or "\x00" in value:
            return value
        path = resolve_path(value, self.base)
        try:
            if path.is_file():
                return self.data(path, field, where)
            if path.is_dir() or any(c in value for c in "*?["):
                files = expand_paths([value], self.base)
            else:
                return value
        except (OSError, ValueError, ConfigError):  # not a file name (a long option value...)
            return value
        return [self.data(file, field, f"{where}/{k}") for k, file in enumerate(files)]


def shipment(plan: Any, dry: bool = False) -> tuple[dict, dict, Path]:
    """(the actors' config, the ``runtime_env`` that brings them its files, the folder to remove after
    the run) for a cluster joined with ``runtime.ray_address``; see the module docstring. A
    :class:`ConfigError` naming ``runtime.ray_address`` and the largest files when they are past
    :data:`SHIP_LIMIT_BYTES`. ``dry``: the same checks with nothing copied (``validate``)."""
    config = plan.config.model_dump(mode="json", by_alias=True, exclude_unset=True)
    ship = _Shipment(plan.base_dir, dry)
    try:
        model = config["model"]
        if model.get("factory"):
            model["factory"] = ship.code(model["factory"], "model.factory", "model")
        if model.get("weights"):
            model["weights"] = ship.data(model["weights"], "model.weights", "model")
        inputs = config["inputs"]
        if inputs.get("dataset"):
            inputs["dataset"] = ship.code(inputs["dataset"], "inputs.dataset", "dataset")
        if inputs.get("paths"):  # the files the driver listed, in its order: the same names there
            inputs["paths"] = [ship.data(ref.path, "inputs.paths", f"inputs/{k}") for k, ref in enumerate(plan.inputs)]
        wrappers = [("wrapper", config.get("wrapper"))]
        wrappers += [(f"methods[{i}].wrapper", m.get("wrapper")) for i, m in enumerate(config["methods"])]
        for n, (field, wrapper) in enumerate(wrappers):
            if isinstance(wrapper, dict) and isinstance(wrapper.get("name"), str):
                wrapper["name"] = ship.code(wrapper["name"], f"{field}.name", f"wrapper{n}")
            if isinstance(wrapper, dict) and isinstance(wrapper.get("mask"), str):
                wrapper["mask"] = ship.data(wrapper["mask"], f"{field}.mask", f"wrapper{n}")
        for i, method in enumerate(config["methods"]):  # files named in params: fit_inputs, baselines...
            for key, value in (method.get("params") or {}).items():
                method["params"][key] = ship.params(value, f"methods[{i}].params.{key}", f"params{i}/{key}")
        summary = (config.get("output") or {}).get("summaries") or {}
        if isinstance(summary.get("labels"), str) and summary["labels"] != "prediction":
            summary["labels"] = ship.data(summary["labels"], "output.summaries.labels", "summaries")
        if isinstance(summary.get("names"), str):
            summary["names"] = ship.data(summary["names"], "output.summaries.names", "summaries")
        if ship.size > SHIP_LIMIT_BYTES:
            largest = ", ".join(f"{field}: {path.name} ({size / 2**20:.1f} MiB)"
                                for size, field, path in sorted(ship.files, key=lambda f: -f[0])[:3])
            raise ConfigError("runtime.ray_address", f"the run's files ({ship.size / 2**20:.0f} MiB in "
                              f"{len(ship.files)} files; largest {largest}) cannot reach the cluster's workers: esegeta "
                              f"ships at most {SHIP_LIMIT_BYTES // 2**20} MiB through Ray's runtime_env. Give the "
                              "inputs through inputs.dataset (a factory reading storage every node mounts), or run "
                              "without ray_address")
    except BaseException:
        if not dry:
            shutil.rmtree(ship.folder, ignore_errors=True)
        raise
    env = {"working_dir": str(ship.folder), "py_modules": [str(PACKAGE)], "excludes": ["__pycache__", "*.pyc"]}
    return config, env, ship.folder


def run(plan: Any, jobs: list, on_done: Callable[[Any, Any], None], on_error: Callable[[Any, BaseException], None]
        ) -> None:
    """``on_done(job, computed)`` (or ``on_error``) for every job, computed by Ray actors."""
    import ray

    rt = plan.config.runtime
    started = not ray.is_initialized()
    # joining a cluster: its files go with the job (Ray takes a working directory at ray.init only)
    shipped = shipment(plan) if started and rt.ray_address and jobs else None
    try:
        if started:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            if rt.ray_address:
                check_address(rt.ray_address)
                try:
                    ray.init(address=rt.ray_address, include_dashboard=False, log_to_driver=False,
                             runtime_env=shipped[1] if shipped else None)
                except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
                    raise ConfigError("runtime.ray_address", f"cannot join the Ray cluster at {rt.ray_address}: "
                                                             f"{type(exc).__name__}: {str(exc)[:200]}") from None
            else:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        _run(plan, jobs, on_done, on_error, shipped)
    finally:
        if shipped is not None:
            shutil.rmtree(shipped[2], ignore_errors=True)
        if started and ray.is_initialized():
            ray.shutdown()


class _RayJobFailed(RuntimeError):
    pass


def _run(plan: Any, jobs: list, on_done, on_error, shipped: tuple[dict, dict, Path] | None = None) -> None:
    import ray
    import ray.data

    if not jobs:
        return
    rt = plan.config.runtime
    actors, gpus, device = _actors(plan.devices, rt.threads_per_device)
    # a CPU actor's share of the threads: on a cluster of its own, that of a local worker
    import torch

    cpus = torch.get_num_threads() if not rt.ray_address else int(ray.cluster_resources().get("CPU", 1))
    threads = max(1, cpus // actors) if device == "cpu" else 1
    rows = [{"id": n, "job": json.dumps({"position": j.position, "inputs": [k for k, _ in j.items], "keys": j.keys,
                                         "labels": [item.label for _, item in j.items]})} for n, j in enumerate(jobs)]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    ctx.execution_options.verbose_progress = False
    # enough blocks that every actor has work (Ray's advice: repartition for the actor pool)
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), actors * 8))
    if shipped is None:
        config = plan.config.model_dump(mode="json", by_alias=True, exclude_unset=True)
        base_dir = str(plan.base_dir) if plan.base_dir else None
    else:  # the actors run in the shipped working directory, on the driver's esegeta
        config, base_dir = shipped[0], "."
    results = dataset.map_batches(
        Explainer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus,
        num_cpus=1 if device == "cpu" else 0,
        fn_constructor_kwargs={"config": config, "base_dir": base_dir,
                               "indices": [e.index for e in plan.entries], "device": device, "threads": threads})
    log.info("ray: %d job(s) on %d actor(s) (%s, %d thread(s) each)", len(jobs), actors, device, threads)
    done: set[int] = set()
    try:
        for row in results.iter_rows():
            job = jobs[int(row["id"])]
            done.add(int(row["id"]))
            status, value = pickle.loads(row["payload"])
            try:
                if status == "done":
                    on_done(job, value)
                else:
                    on_error(job, _RayJobFailed(value))
            except Exception as exc:  # noqa: BLE001 (as a local worker: the job is recorded failed)
                on_error(job, exc)
    except Exception as exc:  # noqa: BLE001 (the cluster failed: every job not back is recorded failed)
        log.error("ray: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        for n, job in enumerate(jobs):
            if n not in done:
                on_error(job, RuntimeError(f"the Ray backend failed: {type(exc).__name__}: "
                                           f"{(str(exc).splitlines() or [''])[0]}"))
