"""One upstream call: a :class:`~esegeta.spec.request.Request` on a prepared model and a batch.

:func:`call_once` finds the layer, wraps a segmenter (each input gets its own frozen masks:
where :mod:`esegeta.attribution.batching` declares how the method lays out its rows, the batch goes to the
upstream in one call with a batched wrapped view, otherwise one input at a time and the results
concatenated; without a wrapper, the batch goes in one call), resolves the target and hands one
:class:`~esegeta.spec.registry.Call` to the method's adapter. Patching is not done here: the
strategies of :mod:`esegeta.attribution.patcher` wrap this call. This module imports neither the config
nor the explainer.
"""
from __future__ import annotations

import logging

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from esegeta.attribution import batching, conservation, wrappers
from esegeta.errors import ConfigError, did_you_mean
from esegeta.attribution.guard import run_guarded
from esegeta.attribution.prepare import CallSites, PreparedModel
from esegeta.spec.params import with_defaults
from esegeta.spec.registry import Call, MethodSpec
from esegeta.spec.request import Request, WrapperConfig
from esegeta.spec.targets import Target

log = logging.getLogger("esegeta")

#: Builds the wrapped (classifier) view of a model for one input: ``(model, x, wrapper, base_dir)``.
WrapperBuilder = Callable[[nn.Module, torch.Tensor, WrapperConfig, "Path | None"], nn.Module]


@dataclass(frozen=True)
class Outcome:
    """What one call gives: the upstream result (float32, batch kept), the explained score of
    each input (when asked for; None where nothing is targeted), the method's extra outputs
    (of the whole batch when it went in one call, else of the first input) and, with the scores,
    per input the facts figures and the manifest show: the resolved target (``"predicted"`` →
    the class index), the predicted column, a wrapper's frozen mask of the explained column and
    the axiom check of the result (:mod:`esegeta.attribution.conservation`; None where none applies)."""
    result: torch.Tensor
    scores: tuple[float | None, ...] = ()
    extras: Mapping[str, Any] = field(default_factory=dict)
    targets: tuple[int | None, ...] = ()
    predicted: tuple[int | None, ...] = ()
    masks: tuple[torch.Tensor | None, ...] = ()
    checks: tuple[conservation.Check | None, ...] = ()


def call_once(request: Request, model: nn.Module, x: torch.Tensor, *, base_dir: Path | None = None,
              samples: torch.Tensor | None = None, with_scores: bool = False, with_masks: bool = True,
              build_wrapper: WrapperBuilder = wrappers.build,
              run: Callable[[MethodSpec, Call], Any] = run_guarded) -> Outcome:
    """Run ``request`` (without its patch) on the prepared ``model`` and inputs ``x``.

    ``samples`` are the run's inputs (for methods that fit on data); ``with_masks`` (with the
    scores) copies each input's frozen mask of its target out (a volume of bytes in 3D); ``with_scores`` costs one
    more forward pass without a wrapper (a wrapper holds its input's scores); ``build_wrapper``
    makes a wrapped view (the patcher's stitched model passes its own, to save memory); ``run``
    computes one call (the adapter's, guarded; global patches pass esegeta's streamed methods)."""
    spec = request.spec
    check_task(spec, request.wrapper)
    layer = find_layers(model, request.layer, spec=spec) if request.layer else None
    kind = batching.layout(request, x.shape[0]) if build_wrapper is wrappers.build else batching.PER_INPUT
    if kind != batching.PER_INPUT:
        build_wrapper = partial(batching.build, kind=kind, method=spec.id)
    pieces = [x] if request.wrapper is None or kind != batching.PER_INPUT else [x[i:i + 1] for i in range(x.shape[0])]
    results, scores, extras, targets, predicted, masks, checks = [], [], [], [], [], [], []
    for n, piece in enumerate(pieces):
        forward = model if request.wrapper is None else build_wrapper(model, piece, request.wrapper, base_dir)
        wanted = request.target
        if torch.is_tensor(wanted) and len(pieces) > 1:  # one target per input, one input per piece
            wanted = wanted[n:n + 1]
        target = resolve_target(forward, piece, wanted) if spec.needs_target else None
        noise_tunnel = dict(request.noise_tunnel) if request.noise_tunnel is not None else None
        extras.append({})
        call = Call(forward, model, piece, target, layer, dict(request.params), noise_tunnel, base_dir, samples,
                    extras[-1])
        results.append(_as_result(run(spec, call)))
        if with_scores:
            explained, top = _explained(forward, piece, target)
            scores += explained
            predicted += top
            chosen = Target.of(target, piece.shape[0])
            targets += chosen.ints() if chosen is not None else [None] * piece.shape[0]
            masks += [frozen_mask(forward, t, i) if with_masks else None for i, t in enumerate(targets[-piece.shape[0]:])]
            one_by_one = request.wrapper is None or kind == batching.PER_INPUT
            checks += _checks(spec, call, results[-1], explained, one_by_one)
    return Outcome(results[0] if len(results) == 1 else torch.cat(results), tuple(scores),
                   MappingProxyType(_joined(extras)),
                   tuple(targets), tuple(predicted), tuple(masks), tuple(checks))


def _joined(pieces: list[dict[str, Any]]) -> dict[str, Any]:
    """The extra outputs of one call per input joined into the batch's: tensors and arrays
    concatenated along the batch axis, dicts key by key, anything else the first input's."""
    if len(pieces) == 1:
        return pieces[0]

    def join(values: list[Any]) -> Any:
        if all(torch.is_tensor(v) for v in values):
            return torch.cat(values)
        if all(isinstance(v, np.ndarray) for v in values):
            return np.concatenate(values)
        if all(isinstance(v, dict) for v in values):
            return {k: join([v[k] for v in values]) for k in values[0] if all(k in v for v in values)}
        return values[0]

    return {k: join([p[k] for p in pieces]) for k in pieces[0] if all(k in p for p in pieces)}


def _checks(spec: MethodSpec, call: Call, result: torch.Tensor, explained: list[float | None],
            one_by_one: bool) -> list[conservation.Check | None]:
    """The axiom check of each input's result in ``call`` (None each where none applies, or where a
    batched wrapper holds every input's masks, so one input's baseline cannot be scored alone)."""
    n = call.inputs.shape[0]
    if not one_by_one or not conservation.applies(spec, call.params, call.noise_tunnel):
        return [None] * n
    chosen = Target.of(call.target, n)
    params = with_defaults(spec, call.params, call.inputs)
    found = []
    for i in range(n):
        one = replace(call, inputs=call.inputs[i:i + 1], target=chosen[i] if chosen is not None else None,
                      params=params, extras={})
        try:
            found.append(conservation.check(spec, one, result[i:i + 1], explained[i]))
        except (ConfigError, ValueError, TypeError, IndexError) as exc:  # cannot be computed: left out, the result stands
            log.debug("%s: axiom check left out: %s: %s", spec.id, type(exc).__name__, exc)
            found.append(None)
    return found


def frozen_mask(forward: nn.Module, target: int | None, index: int = 0) -> torch.Tensor | None:
    """A wrapper's frozen mask of column ``target`` for its ``index``-th input (spatial shape, on
    the CPU; float32, or bytes where the wrapper holds them so: global patches' masks, no float
    copy of a large volume), or None (no wrapper, a custom wrapper without masks, or nothing targeted)."""
    score = getattr(forward, "score", None)
    if target is not None and hasattr(score, "column_mask"):  # masks held per patch (global patches)
        return score.column_mask(target).to("cpu") if 0 <= target < len(score.channels) else None
    masks = getattr(score, "masks", None)
    if target is None or not torch.is_tensor(masks) or not 0 <= target < masks.shape[1]:
        return None
    dtype = torch.uint8 if masks.dtype == torch.uint8 else torch.float32
    return masks[index if masks.shape[0] > 1 else 0, target].detach().to("cpu", dtype)


def find_layers(model: PreparedModel, layer: str | tuple[str, ...], where: str = "layer",
                spec: MethodSpec | None = None) -> nn.Module | list[nn.Module]:
    """The module an entry's ``layer`` names, or, for a method that fuses layers, the list of the
    modules it names (one name: a list of one), each checked by :func:`find_layer`."""
    if isinstance(layer, str) and not (spec is not None and spec.fuses_layers):
        return find_layer(model, layer, where, spec)
    if isinstance(layer, str):
        return [find_layer(model, layer, where, spec)]
    return [find_layer(model, name, f"{where}[{i}]", spec) for i, name in enumerate(layer)]


def find_layer(model: PreparedModel, name: str, where: str = "layer", spec: MethodSpec | None = None) -> nn.Module:
    """The submodule ``name`` of the prepared copy, or a ConfigError with the closest name."""
    names = [n for n, _ in model.model.named_modules() if n and ".sites." not in n]
    try:
        layer = model.layer(name)
    except AttributeError:
        raise ConfigError(where, f"the model has no layer {name!r}" + did_you_mean(name, names)) from None
    except RuntimeError as exc:  # a TorchScript model: "get_submodule is not supported on ScriptModules"
        raise ConfigError(where, f"cannot reach layer {name!r} of this model ({exc}): a TorchScript model's layers "
                                 "take no hooks; give model.factory and a state dict instead") from None
    if spec is not None and spec.leaf_layer and list(layer.children()) and not isinstance(layer, CallSites):
        leaves = [n for n in names if n.startswith(name + ".") and not list(model.layer(n).children())]
        raise ConfigError(where, f"{spec.id} needs a layer without submodules; {name!r} has some: use one of "
                                 f"{', '.join(leaves[:6])}")
    return layer


def resolve_target(forward: nn.Module, x: torch.Tensor, target: Any, where: str = "target",
                   check: bool = False) -> Any:
    """``"predicted"`` → the argmax column per input; an index is checked against the output
    width (for a plain model only when ``check``: that costs a forward pass); a :class:`Target` is
    one the caller resolved and checked (its classes, no forward pass)."""
    if target is None:
        return None
    if isinstance(target, Target):  # resolved by the caller (an evaluation's re-explanations): as it is
        return target.index(x.device)
    if torch.is_tensor(target):  # one index per input (from Python)
        scores = _scores(forward, x)
        if torch.is_tensor(scores) and scores.ndim == 2 and int(target.max()) >= scores.shape[1]:
            raise ConfigError(where, f"target {int(target.max())} does not exist: the output has {scores.shape[1]} "
                                     "columns")
        return target.to(x.device)
    if target != "predicted" and not check and not isinstance(forward, wrappers.WrappedModel):
        return int(target)
    scores = _scores(forward, x)
    if not torch.is_tensor(scores) or scores.ndim != 2:
        shape = tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
        raise ConfigError("wrapper", f"the model output has shape {shape}, not (batch, classes): for a "
                                     "segmentation model set a wrapper (threshold, multiclass, region or custom)")
    if target == "predicted":
        return scores.argmax(dim=1)
    if not 0 <= int(target) < scores.shape[1]:
        what = "the wrapped output" if isinstance(forward, wrappers.WrappedModel) else "the model output"
        raise ConfigError(where, f"target {target} does not exist: {what} has {scores.shape[1]} columns")
    return int(target)


def _scores(forward: nn.Module, x: torch.Tensor) -> Any:
    """The (wrapped) model's scores on ``x``; a wrapper already holds them for its input."""
    unperturbed = getattr(forward, "unperturbed", None)
    if unperturbed is not None:
        return unperturbed
    with torch.no_grad():
        return forward(x)


def _explained(forward: nn.Module, x: torch.Tensor, target: Any) -> tuple[list[float | None], list[int | None]]:
    """The value being explained on each unperturbed input (None where nothing is targeted) and
    each input's predicted (argmax) column."""
    if target is None:
        return [None] * x.shape[0], [None] * x.shape[0]
    scores = _scores(forward, x)
    top = scores.argmax(dim=1).tolist() if torch.is_tensor(scores) and scores.ndim == 2 else [None] * x.shape[0]
    return Target.of(target, x.shape[0]).column(scores).tolist(), top


def check_dims(spec: MethodSpec, x: torch.Tensor, where: str = "inputs") -> None:
    """A ConfigError if ``spec`` does not support inputs of ``x``'s spatial rank."""
    dims = x.ndim - 2
    if dims not in spec.dims:
        supported = " and ".join(f"{d}D" for d in spec.dims)
        raise ConfigError(where, f"{spec.id} supports {supported} inputs only; these inputs are {dims}D")


def check_task(spec: MethodSpec, wrapper: Any, where: str = "wrapper") -> None:
    """A ConfigError if ``spec`` does not apply to a classifier (no wrapper) or a wrapped segmenter."""
    task = "segmentation" if wrapper is not None else "classification"
    if task not in spec.tasks:
        fix = ("remove the wrapper: it explains classifiers only" if wrapper is not None
               else "set a wrapper: it explains wrapped segmentation models only")
        raise ConfigError(where, f"{spec.id} does not apply to {task} models; {fix}")


def _as_result(result: Any) -> torch.Tensor:
    if not torch.is_tensor(result):
        raise TypeError(f"the method returned {type(result).__name__}, not a tensor")
    return result.detach().float()
