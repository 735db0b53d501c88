"""What a run will do, and every problem that would stop it, before anything runs.

:func:`plan` loads the model and the inputs, prepares the model copy and collects the
problems of each method entry: those of its JSON (:func:`entry_problems`: id, library, layer
use, parameter names and values, noise tunnel, patch mode, device) and those seen on the model
(:func:`model_problems`: 2D/3D, classifier/segmenter, layer, wrapper, target). ``validate``
raises them (:meth:`Plan.raise_problems`) and ``esegeta check`` reports them, from the same
functions. :func:`jobs` then turns a plan into jobs, keeping what ``--resume`` may reuse.
"""
from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esegeta.io import resume
from esegeta.run import backends, memory
from esegeta.attribution import batching, scheduling, wrappers
from esegeta.attribution import summaries as summaries_mod
from esegeta.spec import config as config_mod
from esegeta.io import datasets, nnunet, store
from esegeta.attribution.call import check_dims, check_task, find_layers, resolve_target
from esegeta.errors import Problem, raise_problems, ConfigError, did_you_mean
from esegeta.io.datasets import InputRef
from esegeta.io.loading import load_model
from esegeta.spec.params import check_method
from esegeta.attribution.patcher import check_global, first_patch
from esegeta.attribution.architectures import refuse
from esegeta.attribution.prepare import PreparedModel, prepared
from esegeta.spec.config import Resolved, resolve

log = logging.getLogger("esegeta")
#: Kinds whose result has one row per input, so inputs of one shape can share an upstream call.
BATCHABLE_KINDS = ("attribution", "layer", "neuron")


def entry_problems(config: config_mod.Config, index: int) -> list[Problem]:
    """Problems of ``methods[index]`` found from the JSON alone (no model needed)."""
    m, where = config.methods[index], f"methods[{index}]"
    try:
        check_method(m.id, m.params, m.layer, m.noise_tunnel, where, m.enabled)
        e = resolve(m, config, index)
        if e.request.patch is not None and e.request.patch.mode == "global":
            check_global(e.spec, e.request.wrapper, e.where("patch") + ".mode", e.request.noise_tunnel)
        if e.device:
            scheduling.resolve_devices(e.device, e.where("device"))
    except ConfigError as exc:
        return [Problem.of(exc, index)]
    return []


def model_problems(e: Resolved, ready: PreparedModel, x: torch.Tensor, base_dir: Path | None) -> list[Problem]:
    """Problems of an entry seen on the prepared model and the first input ``x``."""
    found: list[Problem] = []
    r = e.request

    def collect(check, *args) -> Any:
        try:
            return check(*args)
        except ConfigError as exc:
            found.append(Problem.of(exc, e.index))
            return None

    collect(check_task, e.spec, r.wrapper, e.where("wrapper"))
    collect(check_dims, e.spec, x, f"methods[{e.index}].id")
    mask = None
    if r.patch is not None:  # the checks' forward passes on the first patch, never the whole volume
        if r.wrapper is not None and r.wrapper.name == "region":
            mask = collect(_region_crop, r.wrapper, x, r.patch, base_dir)
        x = first_patch(x, r.patch)
    if r.layer:
        collect(find_layers, ready, r.layer, f"methods[{e.index}].layer", e.spec)
    if found:
        return found
    collect(lambda: refuse(e.spec, ready, x, f"methods[{e.index}].id", layer=r.layer, params=dict(r.params),
                           wrapper=r.wrapper))
    forward = collect(lambda: wrappers.build(ready, x, r.wrapper, base_dir, mask=mask)) if r.wrapper else ready
    if e.spec.needs_target and forward is not None:
        collect(resolve_target, forward, x, r.target, e.where("target"), True)
    return found


def _region_crop(wrapper: Any, x: torch.Tensor, patch: Any, base_dir: Path | None) -> torch.Tensor:
    """A region wrapper's mask, checked against the whole input's spatial shape, cropped to the first patch."""
    mask = wrappers.region_mask(wrapper.mask, base_dir, x.device)
    spatial = tuple(x.shape[2:])
    if tuple(mask.shape[-len(spatial):]) != spatial or any(n != 1 for n in mask.shape[:-len(spatial)]):
        raise ConfigError("wrapper.mask", f"mask shape {tuple(mask.shape)} does not match the input's spatial "
                                          f"shape {spatial}")
    return first_patch(mask.reshape(1, 1, *spatial), patch)


@dataclass
class Plan:
    """A validated configuration, loaded: model, inputs (listed with safe output names, scanned,
    not held: :mod:`esegeta.io.datasets`), devices, the prepared copy on the first device, the
    selected entries and the problems found."""
    config: config_mod.Config
    base_dir: Path | None
    model: torch.nn.Module
    inputs: list[InputRef]
    devices: list[torch.device]
    ready: PreparedModel
    entries: list[Resolved]
    problems: list[Problem] = field(default_factory=list)
    summaries: summaries_mod.Setting | None = None  # output.summaries, its label map loaded once

    @property
    def device(self) -> torch.device:
        return self.devices[0]

    @property
    def methods(self) -> list[tuple[int, config_mod.MethodEntry]]:
        """(index in ``methods``, entry) of the selected entries (``validate()``'s result before)."""
        return [(e.index, self.config.methods[e.index]) for e in self.entries]

    @property
    def prepared(self) -> PreparedModel:
        return self.ready

    def devices_of(self, e: Resolved) -> list[torch.device]:
        """Where an entry's jobs may run: its own device(s), else the run's."""
        return scheduling.resolve_devices(e.device, e.where("device")) if e.device else self.devices

    def raise_problems(self) -> None:
        raise_problems(self.problems)


def selected(config: config_mod.Config, only: list[str]) -> list[int]:
    """The indices of the enabled entries, or of those ``--only`` names."""
    if not only:
        return [i for i, m in enumerate(config.methods) if m.enabled]
    names = {n for m in config.methods for n in (m.id, m.name)}
    for wanted in only:
        if wanted not in names:
            raise ConfigError("--only", f"no method with id or label {wanted!r}" + did_you_mean(wanted, names))
    return [i for i, m in enumerate(config.methods) if {m.id, m.name} & set(only)]


def plan(config: config_mod.Config, base_dir: Path | None, *, only: list[str] | None = None,
         device: str | None = None, every_entry: bool = False) -> Plan:
    """Load and check what ``config`` needs. Problems of the JSON raise before anything is loaded
    unless ``every_entry`` (``check``: every entry, enabled or not, and its problems collected)."""
    problems = [p for i in range(len(config.methods)) for p in entry_problems(config, i)]
    if not every_entry:
        raise_problems(problems)
    indices = list(range(len(config.methods))) if every_entry else selected(config, list(only or []))
    backends.check(config.runtime.backend)
    store.check(config.output.formats)
    devices = (scheduling.resolve_devices(device, "--device") if device
               else scheduling.resolve_devices(config.runtime.devices))
    model = load_model(config.model, base_dir)
    config = nnunet_patch(config, base_dir, indices)
    inputs = datasets.refs(datasets.source(config.inputs, base_dir, config.model))
    # with Ray the actors hold the replicas: the driver checks on the CPU, holding no GPU memory
    first = inputs[0].tensor.to(devices[0] if config.runtime.backend == "local" else torch.device("cpu"))
    try:  # the prepared copy's one forward pass: on the first patch where the config has patches
        ready = prepared(model, first_patch(first, config.patch))
    except Exception as exc:
        raise model_fails(exc, inputs[0], tuple(first.shape)) from exc
    datasets.scan(inputs)
    memory.trim()  # the scan's freed buffers, held between the small objects it keeps (esegeta.run.memory)
    try:
        summaries = summaries_mod.setting(config.output.summaries, config.inputs, base_dir)
        problems += summaries_mod.shape_problems(summaries, {ref.name: ref.shape for ref in inputs})
    except ConfigError as exc:
        summaries = None
        problems.append(Problem.of(exc))
    bad = {p.entry for p in problems}
    entries = [resolve(config.methods[i], config, i) for i in indices if i not in bad]
    for e in entries:
        problems += model_problems(e, ready, first, base_dir)
    return Plan(config, base_dir, model, inputs, devices, ready, entries, problems, summaries)


def nnunet_patch(config: config_mod.Config, base_dir: Path | None, indices: list[int]) -> config_mod.Config:
    """``config`` with the ``patch`` block a trained nnU-Net model's plans imply when it has none
    (:meth:`esegeta.io.nnunet.TrainedModel.patch`): global (the score of nnU-Net's stitched sliding-window
    prediction) when every selected entry can run so (input-resolution methods with a wrapper), else local."""
    if config.model.nnunet is None or config.patch is not None:
        return config

    def runs_global(i: int) -> bool:
        try:
            e = resolve(config.methods[i], config, i)
            check_global(e.spec, e.request.wrapper, noise_tunnel=e.request.noise_tunnel)
        except ConfigError:
            return False
        return e.request.patch is None

    mode = "global" if all(runs_global(i) for i in indices) else "local"
    patch = nnunet.open_trained(config.model, base_dir).patch(mode, config.inputs.spatial_dims)
    log.info("patch from the nnU-Net plans: size %s, overlap %s (tile step 0.5), %s mode", patch["size"],
             patch["overlap"], mode)
    return config.model_copy(update={"patch": config_mod.PatchConfig(**patch)})


def model_fails(exc: Exception, item: Any, shape: tuple[int, ...]) -> ConfigError:
    """The error for a model that fails on the first input; a channel mismatch names ``inputs.color``."""
    import re

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    found = re.search(r"expected input\[[^\]]*\] to have (\d+) channels, but got (\d+) channels", text)
    if found:
        wanted, got = int(found.group(1)), int(found.group(2))
        fix = {1: "'grayscale'", 3: "'rgb'"}.get(wanted)
        advice = f"set inputs.color to {fix}" if fix else "give inputs with that many channels"
        return ConfigError("inputs.color", f"the model takes {wanted} channel(s), {item.path.name} has {got} as "
                                           f"loaded (shape {shape}): {advice}")
    return ConfigError("inputs", f"the model fails on {item.path.name} (shape {shape}): {type(exc).__name__}: "
                                 f"{text[:300]}")


# -- jobs -----------------------------------------------------------------------------
class Job:
    """One method on one input, or on a batch of same-shaped inputs (``runtime.batch_size``)."""
    __slots__ = ("position", "entry", "items", "keys", "devices")

    def __init__(self, position: int, entry: Resolved, items: list[tuple[int, InputRef]], keys: list[str],
                 devices: list[torch.device]):
        self.position = position  # the entry's place among the selected entries (manifest order)
        self.entry = entry
        self.items = items  # (input index, input)
        self.keys = keys  # resume key per input
        self.devices = devices  # where it may run

    @property
    def name(self) -> str:
        return f"{self.entry.label} on {', '.join(item.name for _, item in self.items)}"

    @property
    def exclusive(self) -> bool:
        return self.entry.spec.exclusive

    def __repr__(self) -> str:
        return f"<Job {self.name}>"


def key_settings(e: Resolved, config: config_mod.Config) -> dict[str, Any]:
    """What decides a method's numbers on an input (the resume key, besides model and input)."""
    rt = config.runtime
    return {
        **e.request.key_settings(), "label": e.label, "model": config.model.model_dump(mode="json"),
        "inputs": config.inputs.model_dump(mode="json", exclude={"paths", "dataset", "dataset_kwargs"}),
        "seed": rt.seed, "amp": rt.amp, "tf32": rt.tf32,
        "batch_size": rt.batch_size, "output": _output_settings(config.output),
    }


def _output_settings(output: config_mod.OutputConfig) -> dict[str, Any]:
    """The output settings a result's files depend on; the attribution store ("zarr") is not one of them:
    a resumed result missing from it is read back from its .npy (:mod:`esegeta.io.store`)."""
    # without summaries the key stays that of runs made before output.summaries existed
    settings = output.model_dump(mode="json", exclude={"dir"} | ({"summaries"} if output.summaries is None else set()))
    settings["formats"] = [f for f in settings["formats"] if f != "zarr"]
    return settings


def jobs(p: Plan, previous: dict[tuple[str, str], dict]) -> tuple[dict[tuple[int, int], dict], Jobs]:
    """Records kept from an earlier run (by (input index, position)), and the jobs left (:class:`Jobs`):
    one per (method, input), or per ``runtime.batch_size`` inputs of one shape for a method that explains
    them in one call (without wrapper, or wrapped by a method whose ``batch_layout`` allows it:
    :func:`esegeta.attribution.batching.layout`)."""
    model_hash = resume.model_digest(p.model)
    samples_hash = datasets.samples_digest(p.inputs)
    kept: dict[tuple[int, int], dict] = {}
    todo = np.ones((len(p.inputs), len(p.entries)), bool)
    keys, batches = [], []
    for position, e in enumerate(p.entries):
        settings = key_settings(e, p.config)
        settings["samples"] = samples_hash if e.spec.library.reads_samples else None
        keys.append(resume.JobKeys(settings, model_hash))
        for k, item in enumerate(p.inputs) if previous else ():  # keys only where an earlier record is
            if (e.label, item.name) in previous:
                record = resume.reusable(previous, e.label, item.name, keys[-1].key(item.digest))
                if record is not None:
                    kept[(k, position)] = {**record, "resumed": True}
                    todo[k, position] = False
        # batching never changes a result: a per_input method (randomness, baselines built from its
        # inputs: a batch's "blur" would be a distribution of every batch-mate) and a noise tunnel run
        # one input per job, with or without a wrapper
        one_call = (e.spec.batch_layout != batching.PER_INPUT and e.request.noise_tunnel is None
                    and (e.request.wrapper is None or batching.layout(e.request, 2) != batching.PER_INPUT))
        batches.append(p.config.runtime.batch_size if (one_call and e.request.patch is None
                                                       and e.spec.kind in BATCHABLE_KINDS) else 1)
    return kept, Jobs(p, todo, keys, batches)


class Jobs:
    """A run's jobs, made as they are taken (memory flat in the number of inputs: issue 26): in the order
    of their first input, then of their entry; ``len()`` is their number, :attr:`results` the (input,
    method) results they compute, :attr:`devices` where they run. What is kept for them is an array of
    a byte per (input, method) (to compute or not) and a shape number per input; a job, its inputs'
    references and resume keys exist from when it is taken until it ends.

    An entry's jobs group its inputs to compute, in order, into batches of ``batches[position]``
    inputs of one shape; a batch waits for its last input, the batches after it wait for it."""

    def __init__(self, p: Plan, todo: np.ndarray, keys: list[resume.JobKeys], batches: list[int]):
        self._plan, self._todo, self._keys, self._batches = p, todo, keys, batches
        shapes: dict[tuple[int, ...] | None, int] = {}
        self._shape = np.fromiter((shapes.setdefault(item.shape, len(shapes)) for item in p.inputs), np.int32,
                                  len(p.inputs))
        counts = [np.bincount(self._shape[todo[:, n]], minlength=len(shapes)) for n in range(todo.shape[1])]
        self._count = sum(int(-(-c // b).sum()) for c, b in zip(counts, batches))  # ceil, per shape
        self.results = int(todo.sum())
        self.devices = list(dict.fromkeys(d for n, e in enumerate(p.entries) if todo[:, n].any()
                                          for d in p.devices_of(e)))

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Job]:
        per_entry = [self._of_entry(position) for position in range(len(self._plan.entries))]
        return heapq.merge(*per_entry, key=lambda job: (job.items[0][0], job.position))

    def _of_entry(self, position: int) -> Iterator[Job]:
        e, batch, inputs = self._plan.entries[position], self._batches[position], self._plan.inputs
        devices = self._plan.devices_of(e)
        filling: dict[int, list[int]] = {}  # shape number -> the batch being filled
        waiting: deque[list[int]] = deque()  # batches in the order of their first input

        def job(group: list[int]) -> Job:
            items = [(k, inputs[k]) for k in group]
            return Job(position, e, items, [self._keys[position].key(item.digest) for _, item in items], devices)

        for k in np.flatnonzero(self._todo[:, position]).tolist():
            shape = int(self._shape[k])
            group = filling.get(shape)
            if group is None:
                group = filling[shape] = []
                waiting.append(group)
            group.append(k)
            if len(group) == batch:
                del filling[shape]
            while waiting and len(waiting[0]) == batch:
                yield job(waiting.popleft())
        while waiting:
            yield job(waiting.popleft())
