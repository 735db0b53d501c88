"""Evaluating attributions: the metrics of an ``evaluation`` block on a run's saved results.

Three entry points share one loop (:func:`score`):

- inside ``esegeta run``, after the attributions are written (:func:`after_run`, when the
  config has an ``evaluation`` block that is ``enabled``);
- ``esegeta evaluate CONFIG`` (:func:`evaluate_run`): on a finished run, reading the ``.npy``
  files its ``manifest.json`` lists; no attribution is recomputed (metrics that re-explain by
  design, randomisation and robustness, explain the randomised model or the perturbed input);
- :func:`evaluate` in Python, on tensors, or on a config (then as ``esegeta evaluate``).

For each input the methods that share a scoring (wrapper, patch, target) are scored in one
batch per metric (one row per method, perturbations stacked, forward in chunks of
``max_batch``); metrics that re-explain run per method. A wrapped segmenter's forward has its
masks frozen on the unperturbed input (:mod:`.scoring`). Layer-resolution maps are
interpolated to the input's grid; feature visualisations and neuron attributions are not
scored (they explain no class score). A metric failing on a method is recorded (value empty,
``error``) and the others go on. Results: ``evaluation`` in ``manifest.json`` and the files
of :mod:`.ranking`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from esegeta.errors import ConfigError, Problem, raise_problems
from esegeta.evaluation import base, ranking
from esegeta.evaluation.base import Context, MetricSpec, SharedPasses, metric
from esegeta.evaluation.scoring import Scorer, as_input_attribution, explainer, scorer, target_of
from esegeta.io.loading import load_callable
from esegeta.errors import did_you_mean
from esegeta.attribution import numerics
from esegeta.io.loading import expand_paths
from esegeta.spec.registry import all_methods
from esegeta.spec.request import from_arguments
from esegeta.spec.evaluation import EvaluationConfig

log = logging.getLogger("esegeta")
#: Kinds of method result the metrics score (see esegeta.spec.registry.KINDS).
SCORED_KINDS = ("attribution", "layer")


@dataclass(frozen=True)
class Metric:
    """A metric as configured: its spec, parameters, and JSON path (``evaluation.metrics[i]``)."""
    spec: MetricSpec
    params: Mapping[str, Any]
    where: str

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def higher_is_better(self) -> bool:
        return self.spec.better_higher(self.params)

    def for_method(self, label: str, overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
        """The parameters for method ``label`` (its override merged in), or None: skipped for it."""
        own = overrides.get(label, {}).get(self.id)
        if own is False:
            return None
        return self.spec.with_defaults({**self.params, **(own or {})})


@dataclass
class Evaluation:
    """An evaluation's results: ``rows`` (one per method, input and metric), curves, the summary."""
    rows: list[dict[str, Any]]
    curves: dict[str, np.ndarray]
    metrics: list[Metric]
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def summary(self) -> ranking.Summary:
        return ranking.Summary(self.rows, {m.id: m.higher_is_better for m in self.metrics})

    def table(self) -> str:
        """The ranking and the Kendall τ matrix as Markdown."""
        return self.summary.markdown()

    def __repr__(self) -> str:
        """A line a console can show (the curves hold an array per method, input and metric)."""
        count = lambda key: len({r[key] for r in self.rows})  # noqa: E731
        return (f"Evaluation({len(self.rows)} values: {count('label')} method(s) × {count('input')} input(s) × "
                f"{count('metric')} metric(s), {len(self.curves)} curve(s), {len(self.skipped)} skipped, "
                f"{self.seconds:.1f} s; .rows, .value(label, metric), .table())")

    def value(self, label: str, metric_id: str, input_name: str | None = None) -> float:
        """The value of (method label, metric) on ``input_name`` (or the mean over inputs)."""
        values = [r["value"] for r in self.rows if r["label"] == label and r["metric"] == metric_id
                  and input_name in (None, r["input"])]
        if not values:
            raise KeyError(f"no value of {metric_id!r} for {label!r}")
        return float(np.nanmean(np.asarray(values, dtype=float)))

    def manifest(self, input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
        """The manifest's ``evaluation`` section (without the file names)."""
        shape = next(iter(input_shapes.values())) if input_shapes else None
        return {"metrics": [metric_row(m, shape) for m in self.metrics], "values": self.rows,
                **self.summary.as_dict(), "skipped": self.skipped, "seconds": round(self.seconds, 3)}

    def save(self, out: str | Path, token: str | None = None) -> dict[str, str]:
        """Write the files of :mod:`.ranking` into ``out``; returns {kind: file name}."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        return ranking.write(out, self.summary, self.curves, token)


def metric_row(m: Metric, input_shape: Sequence[int] | None) -> dict[str, Any]:
    """One configured metric as the manifest lists it (forward passes for ``input_shape`` (C, *S))."""
    passes = m.spec.forward_passes(tuple(input_shape), m.params) if input_shape is not None else None
    return {"id": m.id, "group": m.spec.group, "paper": m.spec.paper, "params": dict(m.spec.with_defaults(m.params)),
            "higher_is_better": m.higher_is_better, "forward_passes_per_input": passes}


# -- checks ----------------------------------------------------------------------------
def configured(evaluation) -> list[Metric]:
    """The block's metrics with their specs; a ConfigError naming the path of a bad one."""
    found, seen = [], {}
    for i, entry in enumerate(evaluation.metrics):
        where = f"evaluation.metrics[{i}]"
        spec = metric(entry.id, f"{where}.id")
        spec.with_defaults(entry.params, f"{where}.params")
        if entry.id in seen:
            raise ConfigError(f"{where}.id", f"metric {entry.id!r} is already listed at evaluation.metrics"
                                             f"[{seen[entry.id]}]; list each metric once")
        seen[entry.id] = i
        found.append(Metric(spec, dict(entry.params), where))
    return found


def problems(config, base_dir: Path | None) -> list[ConfigError]:
    """Every fault of ``config.evaluation`` that needs the registry or the methods, each naming its path."""
    ev, found = config.evaluation, []
    if ev is None:
        return found
    metrics: list[Metric] = []
    for i, entry in enumerate(ev.metrics):
        try:
            metrics += configured(type(ev)(metrics=[entry]))
        except ConfigError as exc:
            found.append(ConfigError(exc.path.replace("evaluation.metrics[0]", f"evaluation.metrics[{i}]"), exc.message))
    ids = ev.metric_ids()
    for i, entry in enumerate(ev.metrics):
        if entry.id in ids[:i]:
            found.append(ConfigError(f"evaluation.metrics[{i}].id", f"metric {entry.id!r} is listed twice; list "
                                                                   "each metric once"))
    labels = [m.name for m in config.methods]
    by_id = {m.id: m for m in metrics}
    for label, settings in ev.overrides.items():
        where = f"evaluation.overrides.{label}"
        if label not in labels:
            found.append(ConfigError(where, f"no method has the label {label!r}" + did_you_mean(label, labels)))
        for metric_id, params in settings.items():
            if metric_id not in ids:
                found.append(ConfigError(f"{where}.{metric_id}", f"{metric_id!r} is not in evaluation.metrics; "
                                                                 f"listed: {', '.join(ids)}"))
            elif isinstance(params, dict) and metric_id in by_id:
                try:
                    by_id[metric_id].spec.with_defaults(params, f"{where}.{metric_id}")
                except ConfigError as exc:
                    found.append(exc)
    wrapped = config.wrapper is not None or any(m.wrapper is not None for m in config.methods)
    for m in metrics:
        if "mask" in m.spec.needs and ev.masks is None and not wrapped:
            found.append(ConfigError(f"{m.where}.id", f"{m.id} compares the attribution with a mask: set "
                                                      "evaluation.masks (one mask file per input), or score a "
                                                      "wrapped segmenter (its frozen mask of the target)"))
    try:
        mask_files(config, base_dir)
    except ConfigError as exc:
        found.append(exc)
    if ev.roar is not None:
        for name in ("train", "data"):
            try:
                load_callable(getattr(ev.roar, name), base_dir, f"evaluation.roar.{name}")
            except ConfigError as exc:
                found.append(exc)
        for j, label in enumerate(ev.roar.methods or []):
            if label not in labels:
                found.append(ConfigError(f"evaluation.roar.methods[{j}]", f"no method has the label {label!r}"))
    return found


def check(config, base_dir: Path | None) -> None:
    """Raise :func:`problems` (one ConfigError; several as one message, a line each)."""
    raise_problems([Problem(e.path, e.message) for e in problems(config, base_dir)])


# -- the loop --------------------------------------------------------------------------
def _seed(seed: int, *parts: Any) -> int:
    digest = hashlib.sha256(json.dumps([seed, *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**62


def _scoring_key(request) -> str:
    return json.dumps([request.wrapper.model_dump(mode="json") if request.wrapper else None,
                       request.patch.model_dump(mode="json") if request.patch else None, request.target],
                      sort_keys=True, default=str)


def model_on_device(model: nn.Module, device: torch.device) -> nn.Module:
    param = next(model.parameters(), None)
    if param is None or param.device == device:
        return model
    return copy.deepcopy(model).to(device)


def score(model: nn.Module, inputs: Sequence[tuple[str, torch.Tensor]],
          attributions: Mapping[tuple[str, str], torch.Tensor], requests: Mapping[str, Any],
          metrics: Sequence[Metric], *, overrides: Mapping[str, Mapping[str, Any]] | None = None,
          masks: Mapping[str, torch.Tensor] | None = None, base_dir: Path | None = None, max_batch: int | None = None,
          seed: int = 0, method_ids: Mapping[str, str] | None = None, inference_copy: bool = True,
          copies: dict[torch.device, nn.Module] | None = None,
          targets: Mapping[str, int] | None = None) -> Evaluation:
    """Every metric on every (method label, input name) of ``attributions``.

    ``inputs`` are (name, (1, C, *S) tensor) on the device to score on; ``requests`` the
    :class:`esegeta.spec.request.Request` of each label (its wrapper, patch and target decide the
    scoring, its method the re-explanations); ``masks`` ground truth per input name;
    ``method_ids`` names a label's method where its request does not (Python, unknown method).
    ``inference_copy``: requests without wrapper and patch are scored on the CPU by one
    :func:`esegeta.evaluation.base.inference_copy` of the model per evaluation where it pays off
    (:func:`esegeta.evaluation.base.copy_pays_off`; kept in ``copies``, device -> copy, where given:
    one copy for several calls), else by the prepared model. ``targets``: one class index per input
    name, in place of the requests' target (the Python API's per-input targets)."""
    start = time.perf_counter()
    overrides = overrides or {}
    rows, curves, skipped = [], {}, []
    models: dict[torch.device, nn.Module] = {}
    copies = {} if copies is None else copies
    stacked: dict[tuple, tuple] = {}
    stores: dict[str, SharedPasses] = {}  # scores shared across the inputs of an unwrapped scoring
    by_name = dict(inputs)
    planned = planned_passes(metrics, attributions, overrides, by_name)

    def forward_for(request, x: torch.Tensor) -> Scorer:
        if x.device not in models:
            models[x.device] = model_on_device(model, x.device)
        fast = None
        if inference_copy and x.device.type == "cpu" and request.wrapper is None and request.patch is None:
            if x.device not in copies and base.copy_pays_off(x[0].numel(), planned):
                copies[x.device] = base.inference_copy(models[x.device])  # made where first needed, once
            fast = copies.get(x.device)  # None where not made or not copyable: the prepared model scores
        return scorer(request, models[x.device], x, base_dir, fast)

    predicted: dict[tuple, tuple[Any, dict[str, torch.Tensor]]] = {}  # unwrapped scorings, their inputs
    for label, name in attributions:
        request = requests[label]
        if request.wrapper is None and request.patch is None:
            x = by_name[name]
            entry = predicted.setdefault((_scoring_key(request), x.device, tuple(x.shape[1:])), (request, {}))
            entry[1][name] = x
    for (key, _, _), (request, xs) in predicted.items():
        store = stores.setdefault(key, SharedPasses(limit=0))
        store.limit += SharedPasses().limit * len(xs)
        if request.target is not None:  # all inputs' unperturbed scores in batched passes, kept in the store
            batch = torch.cat(list(xs.values()))
            with numerics.fp32_numerics():
                Context(forward=forward_for(request, batch), shared=store, max_batch=max_batch).reference_scores(batch)
    for name, x in inputs:
        labels = [label for label, n in attributions if n == name]
        groups: dict[str, list[str]] = {}
        for label in labels:
            groups.setdefault(_scoring_key(requests[label]), []).append(label)
        for group in groups.values():
            request = requests[group[0]]
            stacks = request.wrapper is None and request.patch is None  # the same forward for every input
            shared = stores[_scoring_key(request)] if stacks else SharedPasses()  # else this input's own
            with numerics.fp32_numerics():
                forward = forward_for(request, x)
                target = target_of(request, forward, x,
                                   Context(forward=forward, shared=shared, max_batch=max_batch).reference_scores,
                                   None if targets is None else targets[name], name)
            model_here = models[x.device]
            mask = _mask(masks, name, forward, target, x)
            attrs = {label: as_input_attribution(attributions[(label, name)], x) for label in group}
            for m in metrics:
                for batch, params in _batches(m, group, overrides, attrs, request.wrapper is not None):
                    unit = _Rows([(label, name) for label in batch], x.expand(len(batch), *x.shape[1:]),
                                 torch.cat([attrs[label] for label in batch]), target.expand(len(batch)),
                                 None if mask is None else mask.expand(len(batch), *mask.shape[1:]))
                    if stacks:
                        key = (m.id, batch[0], json.dumps(params, sort_keys=True, default=str), x.device,
                               tuple(x.shape[1:]), tuple(unit.attribution.shape[1:]), mask is None)
                        stacked.setdefault(key, (m, params, forward, model_here, shared, []))[-1].append(unit)
                        continue
                    rows += _run_metric(m, params, unit, requests, forward, model_here, base_dir, max_batch,
                                        [_seed(seed, m.id, name)] * len(batch), curves, method_ids or {}, shared)
                skipped += [f"{m.id} on {label} ({name}): skipped by evaluation.overrides" for label in group
                            if m.for_method(label, overrides) is None]
    for m, params, forward, model_here, shared, units in stacked.values():  # the inputs of a method stacked
        for unit in _stacks(units):
            rows += _run_metric(m, params, unit, requests, forward, model_here, base_dir, max_batch,
                                [_seed(seed, m.id, name) for _, name in unit.keys], curves, method_ids or {}, shared)
    order = {name: i for i, (name, _) in enumerate(inputs)}
    rows.sort(key=lambda r: order[r["input"]])  # input by input, as the rows of one input came
    return Evaluation(rows, curves, list(metrics), skipped, time.perf_counter() - start)


#: The most input values one metric call stacks (16 RGB images of 224²): small inputs go through
#: the model in full batches and a metric's per-input buffers (random subsets, noise) stay bounded.
STACKED_VALUES = 16 * 3 * 224 * 224


def _stacks(units: list[_Rows]) -> list[_Rows]:
    """``units`` (rows of one method and metric, input by input) stacked into calls of at most
    :data:`STACKED_VALUES` input values (at least one unit each)."""
    out, current, values = [], [], 0
    for unit in units:
        size = unit.x.numel()
        if current and values + size > STACKED_VALUES:
            out.append(_Rows.stack(current))
            current, values = [], 0
        current.append(unit)
        values += size
    return out + ([_Rows.stack(current)] if current else [])


def planned_passes(metrics: Sequence[Metric], attributions: Iterable[tuple[str, str]], overrides,
                   inputs: Mapping[str, torch.Tensor]) -> int:
    """The forward passes ``metrics`` will run on the (method label, input name) pairs ``attributions``."""
    total = 0
    for label, name in attributions:
        for m in metrics:
            params = m.for_method(label, overrides or {})
            total += 0 if params is None else m.spec.forward_passes(tuple(inputs[name].shape[1:]), params)
    return total


@dataclass
class _Rows:
    """What one metric call scores: (label, input name) per row, and the rows' stacked tensors."""
    keys: list[tuple[str, str]]
    x: torch.Tensor
    attribution: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor | None

    @staticmethod
    def stack(units: list[_Rows]) -> _Rows:
        masks = [u.mask for u in units]
        return _Rows([k for u in units for k in u.keys], torch.cat([u.x for u in units]),
                     torch.cat([u.attribution for u in units]), torch.cat([u.target for u in units]),
                     None if masks[0] is None else torch.cat(masks))


def mask_problem(mask: torch.Tensor, spatial: Sequence[int]) -> str | None:
    """None if ``mask`` (*S, or with leading axes of size 1) fits inputs of spatial shape ``spatial``, else why not."""
    shape = tuple(mask.shape)
    core = shape
    while len(core) > len(spatial) and core[0] == 1:
        core = core[1:]
    if core == tuple(spatial):
        return None
    kind = f"{len(spatial)}D"
    return (f"a mask of shape {shape} for a {kind} input of spatial shape {tuple(spatial)}: give a {kind} mask of "
            f"shape {tuple(spatial)} (the input's shape after inputs.resize)")


def _mask(masks, name, forward: Scorer, target: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    if masks is not None and name in masks:
        given = torch.as_tensor(masks[name], device=x.device)
        problem = mask_problem(given, x.shape[2:])
        if problem is not None:
            raise ConfigError("evaluation.masks", f"{name}: {problem}")
        return given.reshape(1, 1, *x.shape[2:]) > 0
    return forward.target_mask(int(target[0])) if target.numel() else None


def _batches(m: Metric, group: list[str], overrides, attrs, wrapped: bool) -> list[tuple[list[str], dict[str, Any]]]:
    """Methods scored together by metric ``m`` (same parameters and attribution shape; one by one if it re-explains).

    A wrapper's columns are sums over frozen regions, not logits: ``softmax`` is off for them
    unless the config sets it."""
    batches: list[tuple[list[str], dict[str, Any]]] = []
    for label in group:
        params = m.for_method(label, overrides)
        if params is None:
            continue
        if wrapped and "softmax" in params and "softmax" not in m.params \
                and "softmax" not in (overrides.get(label, {}).get(m.id) or {}):
            params["softmax"] = False
        for labels, p in batches:
            if ("explain" not in m.spec.needs and p == params and attrs[labels[0]].shape == attrs[label].shape):
                labels.append(label)
                break
        else:
            batches.append(([label], params))
    return batches


def _run_metric(m: Metric, params, unit: _Rows, requests, forward, model, base_dir, max_batch,
                row_seeds: list[int], curves, method_ids, shared: SharedPasses | None = None) -> list[dict[str, Any]]:
    """One metric on the rows of ``unit`` (methods of one input, or one method on several inputs),
    batched, each row drawing from its own seed (``row_seeds``: its input's, so a row's values do not
    depend on the rows beside it): their rows (curves into ``curves``)."""
    n = len(unit.keys)
    seed = row_seeds[0]  # a re-explaining method's own randomness (its noise tunnel) and any draw not per row
    explain = explainer(requests[unit.keys[0][0]], forward, base_dir, seed) if "explain" in m.spec.needs else None
    ctx = Context(forward=forward, model=model if "model" in m.spec.needs else None, explain=explain,
                  copy=None if explain is None else explain.copy, mask=unit.mask,
                  generator=torch.Generator().manual_seed(seed), max_batch=max_batch, seed=seed, shared=shared,
                  row_seeds=row_seeds)
    passes = m.spec.forward_passes(tuple(unit.x.shape[1:]), params)
    base = [{"label": label, "method": method_ids.get(label, requests[label].spec.id), "input": name, "metric": m.id,
             "group": m.spec.group, "higher_is_better": m.spec.better_higher(params), "forward_passes": passes}
            for label, name in unit.keys]
    started = time.perf_counter()
    try:
        with numerics.fp32_numerics():
            result = m.spec(ctx, unit.x, unit.attribution, unit.target, **params)
    except Exception as exc:  # noqa: BLE001 (one failing metric never stops the others)
        if isinstance(exc, ConfigError):  # a parameter that does not fit this input: name the config's field
            path = exc.path if exc.path.startswith("evaluation") else f"{m.where}.{exc.path}".rstrip(".")
            error = f"{path}: {exc.message}"
        else:
            error = f"{type(exc).__name__}: {exc}"
        log.error("evaluation: %s on %s failed: %s", m.id, ", ".join(f"{label} ({name})" for label, name in unit.keys),
                  error)
        return [{**row, "value": math.nan, "error": error} for row in base]
    seconds = round((time.perf_counter() - started) / n, 4)
    values = result.values.detach().float().cpu().reshape(-1).tolist()
    for key, curve in (result.curves or {}).items():
        array = curve.detach().float().cpu().numpy() if torch.is_tensor(curve) else np.asarray(curve)
        for i, (label, name) in enumerate(unit.keys):
            curves[f"{label}/{name}/{m.id}/{key}"] = array[i] if array.ndim and array.shape[0] == n else array
    return [{**row, "value": float(v), "seconds": seconds} for row, v in zip(base, values)]


# -- masks of a config ---------------------------------------------------------------
def mask_files(config, base_dir: Path | None) -> list[Path] | None:
    """The files of ``evaluation.masks``, one per input (one file serves all; a ConfigError naming
    ``evaluation.masks`` if the counts differ otherwise)."""
    ev = config.evaluation
    if ev is None or ev.masks is None:
        return None
    try:
        files = expand_paths(ev.masks, base_dir)
    except ConfigError as exc:
        raise ConfigError(exc.path.replace("inputs.paths", "evaluation.masks"), exc.message) from None
    inputs = expand_paths(config.inputs.paths, base_dir)
    if len(files) == 1:  # one mask serves every input
        return files * len(inputs)
    if len(files) != len(inputs):
        raise ConfigError("evaluation.masks", f"names {len(files)} mask file(s) for {len(inputs)} input(s); "
                                              "give one mask per input, in the inputs' order, or one for all")
    return files


# -- Python ----------------------------------------------------------------------------
def evaluate(model, inputs=None, attributions=None, metrics: Sequence[str | Mapping[str, Any]] | None = None, *,
             target: Any = "predicted", wrapper: Mapping[str, Any] | None = None,
             patch: Mapping[str, Any] | None = None, methods: Mapping[str, Any] | None = None,
             masks: torch.Tensor | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None,
             max_batch: int | None = None, seed: int = 0, output_dir: str | Path | None = None,
             inference_copy: bool = True) -> Evaluation:
    """Score attributions with metrics and rank the methods.

    On tensors: ``model`` an ``nn.Module``, ``inputs`` (B, C, *S), ``attributions`` {label:
    (B, C|1, *S)} (or one tensor), ``metrics`` ids or ``{"id", "params"}`` dicts (see
    ``esegeta metrics``). ``methods`` {label: registry id or {"id", "params", "layer", ...}}
    says which esegeta method made each attribution, for metrics that re-explain
    (randomisation, robustness); a label that is a registry id needs no entry. ``target``,
    ``wrapper`` and ``patch`` are those of :func:`esegeta.explain`, or ``target`` one class
    index per input (a list, array or tensor of B); ``masks`` (B, 1, *S)
    ground truth for localisation. ``inference_copy`` (default true) scores the perturbed inputs
    on the CPU with one copy of the model made for this evaluation, its BatchNorms folded into the
    convolutions and its weights channels last (faster; one more copy of the weights in memory:
    :func:`esegeta.evaluation.base.inference_copy`); false scores them with the model itself.
    Returns an :class:`Evaluation` (``.rows``, ``.table()``, ``.summary``, ``.save(dir)``; saved to ``output_dir`` if given).

    (On a config, :func:`esegeta.evaluate` is ``esegeta evaluate``: :mod:`esegeta.run.evaluate`.)
    """
    if not torch.is_tensor(inputs) or inputs.ndim not in (4, 5):
        raise ConfigError("inputs", "inputs must be a tensor (batch, channels, *spatial) with 2 or 3 spatial axes")
    if torch.is_tensor(attributions):
        attributions = {"attribution": attributions}
    if not attributions:
        raise ConfigError("attributions", "give {label: attribution tensor}")
    try:
        block = EvaluationConfig.model_validate({"metrics": list(metrics or ["deletion", "sparseness"])})
    except Exception as exc:  # pydantic's ValidationError
        raise ConfigError("metrics", str(exc)) from None
    configured_metrics = configured(block)
    device = next((p.device for p in model.parameters()), inputs.device)
    x = inputs.detach().to(device=device, dtype=torch.float32)
    names = [f"input{i}" for i in range(x.shape[0])]
    targets = _per_input_targets(target, x.shape[0])
    saved = {(label, names[i]): _one_map(label, a, i, x) for label, a in attributions.items()
             for i in range(x.shape[0])}
    given_masks = None if masks is None else {names[i]: _one_mask(masks, i) for i in range(x.shape[0])}
    classes = targets is not None and all(isinstance(t, int) for t in targets)  # one class index per input
    copies: dict[torch.device, nn.Module | None] = {}  # one copy for all the scorings
    if inference_copy and targets is not None and not classes and device.type == "cpu" and wrapper is None and \
            patch is None and \
            base.copy_pays_off(x[0].numel(), planned_passes(configured_metrics, saved, overrides,
                                                            {n: x[i:i + 1] for i, n in enumerate(names)})):
        copies[device] = base.inference_copy(model)  # input by input below: made here, for all of them
    options = dict(overrides=overrides, masks=given_masks, max_batch=max_batch, seed=seed,
                   inference_copy=inference_copy, copies=copies)
    if targets is None or classes:
        requests, method_ids = _requests(attributions, methods, configured_metrics,
                                         "predicted" if classes else target, wrapper, patch)
        result = score(model, [(n, x[i:i + 1]) for i, n in enumerate(names)], saved, requests, configured_metrics,
                       method_ids=method_ids, targets=dict(zip(names, targets)) if classes else None, **options)
    else:  # with "predicted" or None among them: one scoring per target, its inputs stacked
        parts, by_target, index = [], {}, {name: i for i, name in enumerate(names)}
        for i, t in enumerate(targets):
            by_target.setdefault(t, []).append(names[i])
        for t, chosen in by_target.items():
            requests, method_ids = _requests(attributions, methods, configured_metrics, t, wrapper, patch)
            parts.append(score(model, [(name, x[index[name]:index[name] + 1]) for name in chosen],
                               {k: v for k, v in saved.items() if k[1] in chosen}, requests, configured_metrics,
                               method_ids=method_ids, **options))
        result = Evaluation(sorted((r for e in parts for r in e.rows), key=lambda r: index[r["input"]]),
                            {k: v for e in parts for k, v in e.curves.items()}, configured_metrics,
                            [s for e in parts for s in e.skipped], sum(e.seconds for e in parts))
    if output_dir is not None:
        result.save(output_dir)
    return result


def _per_input_targets(target: Any, n: int) -> list[Any] | None:
    """``target`` as one target per input when it is a sequence (list, tuple, array, 1-d tensor), else None."""
    if isinstance(target, (str, int)) or target is None or (torch.is_tensor(target) and target.ndim == 0):
        return None
    if isinstance(target, np.ndarray) and target.ndim == 0:
        return None
    values = target.tolist() if hasattr(target, "tolist") else list(target)
    if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) or v in ("predicted", None)
                                   for v in values):
        raise ConfigError("target", f"{target!r}: give one target for all inputs (a class index, 'predicted' or "
                                    f"None) or one per input ({n} class indices)")
    return values


def _one_map(label: str, a: Any, i: int, x: torch.Tensor) -> torch.Tensor:
    """Input ``i``'s map of ``attributions[label]`` as (1, C|1, *S); a ConfigError where it cannot score ``x``."""
    a = torch.as_tensor(a)
    if a.ndim not in (x.ndim - 1, x.ndim) or a.shape[0] != x.shape[0]:
        raise ConfigError(f"attributions.{label}", f"shape {tuple(a.shape)} does not fit inputs {tuple(x.shape)}: "
                                                   "give (batch, channels or 1, *spatial), one map per input")
    return a[i:i + 1].float()


def _one_mask(masks: Any, i: int) -> torch.Tensor:
    return torch.as_tensor(masks)[i:i + 1]


def _requests(attributions, methods, configured_metrics, target, wrapper, patch) -> tuple[dict, dict]:
    """The request of each label (its method, for re-explanations; the target, wrapper and patch of the scoring)."""
    requests, known, method_ids = {}, all_methods(), {}
    for label in attributions:
        given = (methods or {}).get(label, label if label in known else None)
        if given is None:
            needing = [m.id for m in configured_metrics if "explain" in m.spec.needs]
            if needing:
                raise ConfigError(f"methods.{label}", f"{', '.join(needing)} re-explain with the method that made "
                                                      f"{label!r}: give methods={{{label!r}: 'captum.Saliency'}} "
                                                      "(its registry id, or {'id', 'params', 'layer'})")
            method_ids[label] = label
            given = "captum.Saliency"  # scores only: the request carries the target, wrapper and patch
        entry = {"id": given} if isinstance(given, str) else dict(given)
        method_id = entry.pop("id")
        requests[label] = from_arguments(method_id, target=target, wrapper=wrapper, patch=patch,
                                         layer=entry.pop("layer", None), noise_tunnel=entry.pop("noise_tunnel", None),
                                         params=entry.pop("params", entry))
    return requests, method_ids


__all__ = ["SCORED_KINDS", "Evaluation", "Metric", "check", "configured", "evaluate", "mask_files", "mask_problem",
           "problems", "score"]
