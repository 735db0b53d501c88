"""``explain``: one method on one model and a batch of inputs, as the upstream returns it.

:func:`run` computes a :class:`~esegeta.spec.request.Request` on a prepared model: the patch
strategy of :mod:`esegeta.attribution.patcher` around the one upstream call of :mod:`esegeta.attribution.call`.
:func:`explain` is the Python face: its arguments become a request, checked, and run on a
prepared copy of the model (:mod:`esegeta.attribution.prepare`) in full float32.
"""
from __future__ import annotations

from collections.abc import Mapping
import warnings
from typing import Any

import torch
from torch import nn

from esegeta.attribution import architectures, conservation, numerics, patcher, verdicts
from esegeta.attribution.architectures import refuse
from esegeta.attribution.call import Outcome, call_once
from esegeta.errors import ConfigError, NonFiniteResult
from esegeta.hooks import removing
from esegeta.spec.params import check_method
from esegeta.attribution.prepare import PreparedModel, prepared
from esegeta.spec.request import Request, from_arguments
from esegeta.spec.values import from_python
from esegeta.attribution.call import check_dims


def run(request: Request, model: PreparedModel, x: torch.Tensor, **kw: Any) -> Outcome:
    """``request`` on the prepared ``model`` and inputs ``x``, patch by patch if it has a patch.

    ``kw`` are :func:`esegeta.attribution.call.call_once`'s: ``base_dir``, ``samples``, ``with_scores``."""
    return patcher.strategy(request.patch)(call_once, request, model, x, **kw)


def explain(model: nn.Module, inputs: torch.Tensor, method: str, /, target: Any = "predicted", *,
            wrapper: Mapping[str, Any] | None = None, layer: str | nn.Module | None = None,
            noise_tunnel: Mapping[str, Any] | None = None, patch: Mapping[str, Any] | None = None,
            **params: Any) -> torch.Tensor:
    """Attribute ``model``'s output for ``target`` to ``inputs`` with ``method``.

    - ``inputs``: a batch, ``(batch, channels, *spatial)``; one image is ``x[None]``.
    - ``method``: a registry id such as ``"captum.IntegratedGradients"`` (``esegeta.methods()``
      lists them); ``params`` are its upstream keyword arguments (``n_steps=32``), in the forms
      upstream takes (tuples, NumPy and torch scalars: see :func:`esegeta.spec.values.from_python`).
    - ``target``: what is explained, as in a config: ``"predicted"`` (the default: each input's
      top class, or with a wrapper its top column), a class index for every input, or one index
      per input as a list or a tensor. Methods that explain no class ignore it.
    - ``wrapper``: for a segmentation model, how its output map becomes scores, e.g.
      ``{"name": "threshold", "threshold": 0.5}`` (see :mod:`esegeta.attribution.wrappers`).
    - ``layer``: for layer and neuron methods, the layer as Captum takes it (a submodule of
      ``model``) or its name (``"layer4"``).
    - ``noise_tunnel``: wrap the method in Captum's NoiseTunnel (``{"nt_samples": 8}``).
    - ``patch``: explain the input patch by patch on torchio's grid, e.g.
      ``{"size": [32, 32, 32], "overlap": [8, 8, 8], "mode": "global"}`` (:mod:`esegeta.attribution.patcher`).

    ``model``, ``inputs`` and ``method`` are positional-only, so upstream parameters of the same
    name (Captum's ``method="riemann_trapezoid"``) pass through ``params``. Mistakes raise
    :class:`~esegeta.errors.ConfigError` naming the argument and the fix, checked as a config
    would be (method supports the inputs' 2D/3D and the model's task, layer exists, values fit).

    Returns a ``torch.Tensor`` as the upstream library computes it, float32 with the batch
    dimension kept, computed without TF32. (``Pipeline(...).run().result(...)`` returns the
    saved NumPy array instead: a run's results are files.) The model is not modified: the
    method runs on a prepared copy (cached while the weights are unchanged).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError("model", f"model must be a torch.nn.Module, not {type(model).__name__}")
    layer = _layer_name(model, layer)
    # Python's forms (tuples, NumPy/torch scalars) written as a config would, then checked as one
    params = from_python(params)
    noise_tunnel, wrapper, patch = (from_python(dict(v)) if isinstance(v, Mapping) else v
                                    for v in (noise_tunnel, wrapper, patch))
    request = from_arguments(method, target=None, wrapper=wrapper, layer=layer, noise_tunnel=noise_tunnel,
                             patch=patch, params=params)
    check_method(method, params, layer, noise_tunnel, "explain")
    if not torch.is_tensor(inputs):
        raise ConfigError("inputs", f"inputs must be a tensor (batch, channels, *spatial), not {type(inputs).__name__}")
    _check_batched(model, inputs)
    if inputs.ndim in (4, 5):  # 2D or 3D inputs: the method must support their rank, as in a run
        check_dims(request.spec, inputs, "inputs")
    device = next((p.device for p in model.parameters()), inputs.device)
    x = inputs.detach().to(device=device, dtype=torch.float32)  # the caller's tensor keeps requires_grad as it was
    request = request.replace(target=_target(target, x.shape[0], x.device))
    # the prepared copy counts module calls on one forward: with patches, on a patch-sized crop
    example = patcher.first_patch(x, request.patch)
    with numerics.fp32_numerics():
        ready = prepared(model, example)
        refuse(request.spec, ready, example, "explain.method", layer=layer, params=request.params, wrapper=wrapper)
        check = request.wrapper is None and request.spec.needs_target and request.target not in (None, "predicted")
        # "predicted" finds a map itself; an index is checked on the method's own first forward pass
        with removing() as handles:
            if check:
                handles.append(ready.register_forward_hook(_scores_not_a_map))
            # the verdicts read values: none on torch's meta device (device tests)
            judged = x.device.type != "meta"
            # one forward pass more than the method's own: the explained score, which a NaN may hide in
            # behind a finite gradient, and which the axiom check compares with
            outcome = run(request, ready, x, samples=x, with_scores=judged and request.spec.needs_target,
                          with_masks=False)  # explain returns no masks
        if judged:
            _verdicts(request, ready, x, outcome)
    return outcome.result


def _verdicts(request: Request, ready: PreparedModel, x: torch.Tensor, outcome: Outcome) -> None:
    """What a run records, said by ``explain``: a non-finite result raises
    :class:`~esegeta.errors.NonFiniteResult` naming where the values came from (a run marks it
    ``failed``); an axiom that does not hold (:mod:`esegeta.attribution.conservation`) warns with
    the likely cause and the fix."""
    scores = list(outcome.scores) or [None] * x.shape[0]
    for n in range(x.shape[0]):
        problem = verdicts.nonfinite_problem(outcome.result[n:n + 1], x[n:n + 1], ready, scores[n],
                                             request.spec.axiom)
        if problem:
            where = f" (input {n})" if x.shape[0] > 1 else ""
            raise NonFiniteResult(f"{request.spec.id}{where}: {problem}")
    checks = [c for c in outcome.checks if c is not None]
    if not checks:
        return
    # a structural trace (gates): on a patch with patches, never the whole volume
    notes = architectures.axiom_notes(request.spec, architectures.network(ready), patcher.first_patch(x[:1], request.patch))
    for n, check in enumerate(outcome.checks):
        off = check and conservation.warning(request.spec, check, notes, request.wrapper)
        if off:
            warnings.warn(f"{request.spec.id}{f' (input {n})' if x.shape[0] > 1 else ''}: {off}",
                          AxiomWarning, stacklevel=3)


class AxiomWarning(UserWarning):
    """A method's axiom (conservation, summation to delta, completeness) does not hold on a result."""


def _layer_name(model: nn.Module, layer: Any) -> str | list[str] | None:
    """A layer given as a module (as Captum takes it) → its name in ``model``; a list of them (a
    method that fuses several layers) → the list of their names."""
    if layer is None or isinstance(layer, str):
        return layer
    if isinstance(layer, (list, tuple)):
        return [_layer_name(model, one) for one in layer]
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer and name:
                return name
        raise ConfigError("layer", f"the {type(layer).__name__} given as layer is not a submodule of the model "
                                   "(pass a module of this model, or its name)")
    raise ConfigError("layer", f"layer must be a submodule of the model or its name, not {type(layer).__name__}")


def _target(target: Any, n: int, device: torch.device) -> Any:
    """``target`` as the request holds it: ``"predicted"``, None, one index, or a tensor of ``n``."""
    if target is None or isinstance(target, str):
        if isinstance(target, str) and target != "predicted":
            raise ConfigError("target", f"target {target!r}: use 'predicted', a class index, or one index per input")
        return target
    if isinstance(target, bool):
        raise ConfigError("target", "target must be a class index, not a boolean")
    if isinstance(target, int):
        if target < 0:
            raise ConfigError("target", f"target {target} is negative; class indices start at 0")
        return target
    try:
        values = torch.as_tensor(target)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError("target", f"target must be 'predicted', an index, or one index per input, not "
                                    f"{type(target).__name__}") from None
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ConfigError("target", f"targets are class indices (integers), not {values.dtype}")
    values = values.reshape(-1)
    if values.numel() == 1:
        return _target(int(values), n, device)
    if values.numel() != n:
        raise ConfigError("target", f"{values.numel()} targets for {n} inputs: give one per input, or one for all")
    if (values < 0).any():
        raise ConfigError("target", "class indices start at 0; a target is negative")
    return values.to(device=device, dtype=torch.long)


def _check_batched(model: nn.Module, inputs: torch.Tensor) -> None:
    """A clear error for an input without its batch axis (the first convolution tells the rank)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    wanted = conv.weight.ndim if conv is not None else None
    if inputs.ndim < 3 or (wanted is not None and inputs.ndim == wanted - 1):
        looks = f" (channels {inputs.shape[0]})" if conv is not None and inputs.shape[0] == conv.in_channels else ""
        raise ConfigError("inputs", f"inputs of shape {tuple(inputs.shape)} have no batch axis{looks}: explain takes "
                                    "(batch, channels, *spatial); for one input pass inputs[None]")


def _scores_not_a_map(module: nn.Module, args: Any, out: Any) -> None:
    """A forward hook: a model without a wrapper must give (batch, classes) scores; a map asks for a wrapper."""
    if torch.is_tensor(out) and out.ndim > 2:
        raise ConfigError("wrapper", f"the model outputs {tuple(out.shape)}, a segmentation map: set a wrapper, e.g. "
                                     "wrapper={'name': 'threshold'} (or 'multiclass', 'region', 'file.py:callable')")
