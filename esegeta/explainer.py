"""``explain``: one method on one model and a batch of inputs, as the upstream returns it.

The method runs on a prepared copy of the model (:mod:`esegeta.prepare`). With a wrapper,
each input gets its own frozen masks, so the batch is explained one input at a time and
the results are concatenated; without one, the batch goes to the upstream in one call.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import registry, wrappers
from .config import PatchConfig, WrapperConfig, check_method
from .errors import ConfigError, did_you_mean
from .prepare import CallSites, PreparedModel, prepared
from .registry import Call, MethodSpec


def find_layer(model: PreparedModel, name: str, where: str = "layer", spec: MethodSpec | None = None) -> nn.Module:
    """The submodule ``name`` of the prepared copy, or a ConfigError with the closest name."""
    names = [n for n, _ in model.model.named_modules() if n and ".sites." not in n]
    try:
        layer = model.layer(name)
    except AttributeError:
        raise ConfigError(where, f"the model has no layer {name!r}" + did_you_mean(name, names)) from None
    if spec is not None and spec.leaf_layer and list(layer.children()) and not isinstance(layer, CallSites):
        leaves = [n for n in names if n.startswith(name + ".") and not list(model.layer(n).children())]
        raise ConfigError(where, f"{spec.id} needs a layer without submodules; {name!r} has some: use one of "
                                 f"{', '.join(leaves[:6])}")
    return layer


def resolve_target(forward: nn.Module, x: torch.Tensor, target: Any, where: str = "target",
                   check: bool = False) -> Any:
    """``"predicted"`` → the argmax column per input; an index is checked against the output
    width (for a plain model only when ``check``: that costs a forward pass)."""
    if target is None:
        return None
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


def score_of(forward: nn.Module, x: torch.Tensor, target: Any) -> float | None:
    """The value being explained on the unperturbed input (first input of the batch)."""
    if target is None:
        return None
    scores = _scores(forward, x)
    index = int(target[0]) if torch.is_tensor(target) else int(target)
    return float(scores[0, index])


def run_method(spec: MethodSpec, model: PreparedModel, x: torch.Tensor, *, target: Any = None,
               wrapper: Mapping[str, Any] | None = None, layer: str | None = None,
               params: Mapping[str, Any] | None = None, noise_tunnel: Mapping[str, Any] | None = None,
               base_dir: Path | None = None, with_score: bool = False, samples: torch.Tensor | None = None,
               extras: dict[str, Any] | None = None,
               patch: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, float | None]:
    """Run ``spec`` on the prepared model; returns (upstream result, score of the first input
    if ``with_score``, else None: the score costs one more forward pass). ``samples`` are the
    run's inputs (for methods that fit on data); extra outputs of the method land in
    ``extras`` (those of the first input when a wrapper splits the batch). With ``patch``
    (a :class:`esegeta.config.PatchConfig` as a dict) the input is explained patch by patch
    (:mod:`esegeta.patcher`)."""
    check_task(spec, wrapper)
    if patch is not None:
        from .patcher import run_patched

        return run_patched(spec, model, x, patch, target=target, wrapper=wrapper, layer=layer, params=params,
                           noise_tunnel=noise_tunnel, base_dir=base_dir, with_score=with_score, samples=samples,
                           extras=extras)
    layer_module = find_layer(model, layer, spec=spec) if layer else None
    call_params = dict(params or {})
    nt = dict(noise_tunnel) if noise_tunnel is not None else None
    extras = {} if extras is None else extras
    if wrapper is None:
        resolved = resolve_target(model, x, target) if spec.needs_target else None
        call = Call(model, model, x, resolved, layer_module, call_params, nt, base_dir, samples, extras)
        return _as_result(spec.adapter.run(spec, call)), score_of(model, x, resolved) if with_score else None
    results, score = [], None
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        # a model may build its own wrapped view (the patcher's stitched model does, to save memory)
        forward = getattr(model, "build_wrapper", wrappers.build)(model, xi, wrapper, base_dir)
        resolved = resolve_target(forward, xi, target) if spec.needs_target else None
        call = Call(forward, model, xi, resolved, layer_module, call_params, nt, base_dir, samples,
                    extras if i == 0 else {})
        results.append(_as_result(spec.adapter.run(spec, call)))
        if i == 0 and with_score:
            score = score_of(forward, xi, resolved)
    return torch.cat(results), score


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


def explain(model: nn.Module, inputs: torch.Tensor, method: str, /, target: Any = None, *,
            wrapper: Mapping[str, Any] | None = None, layer: str | None = None,
            noise_tunnel: Mapping[str, Any] | None = None, patch: Mapping[str, Any] | None = None,
            **params: Any) -> torch.Tensor:
    """Attribute ``model``'s output for ``target`` to ``inputs`` with ``method``.

    ``method`` is a registry id such as ``"captum.IntegratedGradients"``; ``params`` are the
    upstream keyword arguments (``n_steps=32``); ``target`` is a class index, ``"predicted"``,
    or with a ``wrapper`` (e.g. ``{"name": "threshold", "threshold": 0.5}``) a wrapped column.
    ``patch`` (e.g. ``{"size": [32, 32, 32], "overlap": [8, 8, 8], "mode": "global"}``) explains
    the input patch by patch (SPEC §5, :mod:`esegeta.patcher`).
    ``model``, ``inputs`` and ``method`` are positional-only, so upstream parameters of the
    same name (Captum's ``method="riemann_trapezoid"``) pass through ``params``.
    Returns the upstream result as float32 with the batch dimension kept. The model is not
    modified: the method runs on a prepared copy (cached while the weights are unchanged).
    """
    spec = registry.get(method, "method")
    check_method(method, params, layer, dict(noise_tunnel) if noise_tunnel is not None else None, "explain")
    if not torch.is_tensor(inputs) or inputs.ndim < 3:
        raise ConfigError("inputs", "inputs must be a tensor (batch, channels, *spatial)")
    wrapper_cfg = None
    if wrapper is not None:
        try:
            wrapper_cfg = WrapperConfig.model_validate(dict(wrapper)).model_dump()
        except Exception as exc:
            raise ConfigError("wrapper", str(exc)) from None
    patch_cfg = None
    if patch is not None:
        try:
            patch_cfg = PatchConfig.model_validate(dict(patch)).model_dump()
        except ValueError as exc:  # pydantic's ValidationError
            raise ConfigError("patch", str(exc)) from None
    device = next((p.device for p in model.parameters()), inputs.device)
    x = inputs.detach().to(device=device, dtype=torch.float32)  # the caller's tensor keeps requires_grad as it was
    # the prepared copy counts module calls on one forward: with patches, on a patch-sized crop
    example = x if patch_cfg is None else x[(slice(None), slice(None)) + tuple(slice(0, s) for s in patch_cfg["size"])]
    result, _ = run_method(spec, prepared(model, example), x, target=target, wrapper=wrapper_cfg, layer=layer,
                           params=params, noise_tunnel=noise_tunnel, samples=x, patch=patch_cfg)
    return result
