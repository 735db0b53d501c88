"""What a run will do, and every problem that would stop it, before anything runs.

:func:`plan` loads the model and the inputs, prepares the model copy and collects the
problems of each method entry: those of its JSON (:func:`entry_problems`: id, library, layer
use, parameter names and values, noise tunnel, patch mode, device) and those seen on the model
(:func:`model_problems`: 2D/3D, classifier/segmenter, layer, wrapper, target). ``validate``
raises them (:meth:`Plan.raise_problems`) and ``esegeta check`` reports them, from the same
functions. :func:`jobs` then turns a plan into jobs, keeping what ``--resume`` may reuse.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import config as config_mod, registry, resume, scheduling, wrappers
from .errors import ConfigError, did_you_mean
from .explainer import check_dims, check_task, find_layer, resolve_target
from .loading import InputItem, load_inputs, load_model
from .prepare import PreparedModel, prepared
from .writer import unique_names

#: Kinds whose result has one row per input, so inputs of one shape can share an upstream call.
BATCHABLE_KINDS = ("attribution", "layer", "neuron")


@dataclass(frozen=True)
class Problem:
    """One reason a method entry (``entry``: its index in ``methods``; None: the config) cannot run."""

    path: str
    message: str
    entry: int | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    @classmethod
    def of(cls, exc: ConfigError, entry: int | None = None) -> Problem:
        return cls(exc.path, exc.message, entry)


def raise_problems(problems: list[Problem]) -> None:
    """A ConfigError for one problem as it is, for several one per line; nothing if none."""
    if len(problems) == 1:
        raise ConfigError(problems[0].path, problems[0].message)
    if problems:
        raise ConfigError("", "\n".join(map(str, problems)))


@dataclass(frozen=True)
class Entry:
    """A selected method entry with what it takes from the config resolved once: the entry's
    wrapper, target, patch, time limit and device if it sets them, else the config's."""

    index: int
    config: config_mod.MethodEntry
    spec: registry.MethodSpec
    wrapper: config_mod.WrapperConfig | None
    target: Any
    patch: config_mod.PatchConfig | None
    timeout_s: float | None
    devices: list[torch.device]

    @property
    def label(self) -> str:
        return self.config.name

    def where(self, name: str) -> str:
        """The JSON path of ``name``: the entry's field if it sets it, else the config's."""
        own = getattr(self.config, name, None) is not None
        return f"methods[{self.index}].{name}" if own else name


def resolve(config: config_mod.Config, index: int, devices: list[torch.device]) -> Entry:
    m = config.methods[index]
    rt = config.runtime
    return Entry(index, m, registry.get(m.id), m.wrapper or config.wrapper,
                 m.target if m.target is not None else config.target, m.patch or config.patch,
                 m.timeout_s or rt.timeout_s,
                 scheduling.resolve_devices(m.device, f"methods[{index}].device") if m.device else devices)


def entry_problems(config: config_mod.Config, index: int) -> list[Problem]:
    """Problems of ``methods[index]`` found from the JSON alone (no model needed)."""
    m, where = config.methods[index], f"methods[{index}]"
    try:
        config_mod.check_method(m.id, m.params, m.layer, m.noise_tunnel, where)
        patch = m.patch or config.patch
        if patch is not None and patch.mode == "global":
            from .patcher import check_global

            check_global(registry.get(m.id), m.wrapper or config.wrapper,
                         f"{where}.patch.mode" if m.patch else "patch.mode")
        if m.device:
            scheduling.resolve_devices(m.device, f"{where}.device")
    except ConfigError as exc:
        return [Problem.of(exc, index)]
    return []


def model_problems(e: Entry, ready: PreparedModel, x: torch.Tensor, base_dir: Path | None) -> list[Problem]:
    """Problems of an entry seen on the prepared model and the first input ``x``."""
    found: list[Problem] = []

    def collect(check, *args) -> Any:
        try:
            return check(*args)
        except ConfigError as exc:
            found.append(Problem.of(exc, e.index))
            return None

    collect(check_task, e.spec, e.wrapper, e.where("wrapper"))
    collect(check_dims, e.spec, x, f"methods[{e.index}].id")
    if e.config.layer:
        collect(find_layer, ready, e.config.layer, f"methods[{e.index}].layer", e.spec)
    if found:
        return found
    forward = collect(wrappers.build, ready, x, e.wrapper.model_dump(), base_dir) if e.wrapper else ready
    if e.spec.needs_target and forward is not None:
        collect(resolve_target, forward, x, e.target, e.where("target"), True)
    return found


@dataclass
class Plan:
    """A validated configuration, loaded: model, inputs (with safe output names), devices, the
    prepared copy on the first device, the selected entries and the problems found."""

    config: config_mod.Config
    base_dir: Path | None
    model: torch.nn.Module
    inputs: list[InputItem]
    devices: list[torch.device]
    ready: PreparedModel
    entries: list[Entry]
    problems: list[Problem] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.devices[0]

    @property
    def methods(self) -> list[tuple[int, config_mod.MethodEntry]]:
        """(index in ``methods``, entry) of the selected entries (``validate()``'s result before)."""
        return [(e.index, e.config) for e in self.entries]

    @property
    def prepared(self) -> PreparedModel:
        return self.ready

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
    devices = (scheduling.resolve_devices(device, "--device") if device
               else scheduling.resolve_devices(config.runtime.devices))
    model = load_model(config.model.model_dump(), base_dir)
    inputs = load_inputs(config.inputs.model_dump(), base_dir)
    inputs = [replace(item, name=name) for item, name in zip(inputs, unique_names([i.name for i in inputs]))]
    first = inputs[0].tensor.to(devices[0])
    try:
        ready = prepared(model, first)
    except Exception as exc:
        raise ConfigError("inputs", f"the model fails on {inputs[0].path.name} (shape "
                                    f"{tuple(inputs[0].tensor.shape)}): {type(exc).__name__}: {exc}") from exc
    bad = {p.entry for p in problems}
    entries = [resolve(config, i, devices) for i in indices if i not in bad]
    for e in entries:
        problems += model_problems(e, ready, first, base_dir)
    return Plan(config, base_dir, model, inputs, devices, ready, entries, problems)


# -- jobs -----------------------------------------------------------------------------
@dataclass
class Job:
    """One method on one input, or on a batch of same-shaped inputs (``runtime.batch_size``)."""

    position: int  # the entry's place among the selected entries (manifest order)
    entry: Entry
    items: list[tuple[int, InputItem]]  # (input index, input)
    keys: list[str]  # resume key per input
    devices: list[torch.device]  # where it may run

    @property
    def name(self) -> str:
        return f"{self.entry.label} on {', '.join(item.name for _, item in self.items)}"

    @property
    def exclusive(self) -> bool:
        return self.entry.spec.exclusive


def key_settings(e: Entry, config: config_mod.Config) -> dict[str, Any]:
    """What decides a method's numbers on an input (the resume key, besides model and input)."""
    m, rt = e.config, config.runtime
    return {
        "id": m.id, "label": m.name, "params": m.params, "layer": m.layer, "noise_tunnel": m.noise_tunnel,
        "wrapper": e.wrapper.model_dump(mode="json") if e.wrapper else None, "target": e.target,
        "patch": e.patch.model_dump(mode="json") if e.patch else None,
        "model": config.model.model_dump(mode="json"),
        "inputs": config.inputs.model_dump(mode="json", exclude={"paths"}), "seed": rt.seed, "amp": rt.amp, "tf32": rt.tf32,
        "batch_size": rt.batch_size, "output": config.output.model_dump(mode="json", exclude={"dir"}),
    }


def jobs(p: Plan, previous: dict[tuple[str, str], dict]) -> tuple[dict[tuple[int, int], dict], list[Job]]:
    """Records kept from an earlier run (by (input index, position)), and the jobs left: one per
    (method, input), or per ``runtime.batch_size`` inputs of one shape for a method without wrapper."""
    model_hash = resume.model_digest(p.model)
    input_hashes = [resume.tensor_digest([item.tensor]) for item in p.inputs]
    shape = p.inputs[0].tensor.shape
    samples_hash = resume.tensor_digest([i.tensor for i in p.inputs if i.tensor.shape == shape])
    kept: dict[tuple[int, int], dict] = {}
    todo_jobs: list[Job] = []
    for position, e in enumerate(p.entries):
        settings = key_settings(e, p.config)
        settings["samples"] = None if resume.ignores_samples(e.spec.id) else samples_hash
        todo: list[tuple[int, InputItem, str]] = []
        for k, item in enumerate(p.inputs):
            key = resume.job_key(settings, model_hash, input_hashes[k])
            record = resume.reusable(previous, e.label, item.name, key)
            if record is not None:
                kept[(k, position)] = {**record, "resumed": True}
            else:
                todo.append((k, item, key))
        batch = p.config.runtime.batch_size if (e.wrapper is None and e.patch is None
                                                and e.spec.kind in BATCHABLE_KINDS) else 1
        while todo:
            group = [t for t in todo if t[1].tensor.shape == todo[0][1].tensor.shape][:batch]
            taken = {k for k, _, _ in group}
            todo = [t for t in todo if t[0] not in taken]
            todo_jobs.append(Job(position, e, [(k, item) for k, item, _ in group], [key for _, _, key in group],
                                 e.devices))
    todo_jobs.sort(key=lambda j: (j.items[0][0], j.position))
    return kept, todo_jobs
