"""``explain``: one method on one model and a batch of inputs, as the upstream returns it.

:func:`run` computes a :class:`~esegeta.request.Request` on a prepared model: the patch
strategy of :mod:`esegeta.patcher` around the one upstream call of :mod:`esegeta.call`.
:func:`explain` is the Python face: its arguments become a request, checked, and run on a
prepared copy of the model (:mod:`esegeta.prepare`) in full float32.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import numerics, patcher
from .architectures import refuse
from .call import Outcome, call_once
from .errors import ConfigError
from .params import check_method
from .prepare import PreparedModel, prepared
from .request import Request, from_arguments


def run(request: Request, model: PreparedModel, x: torch.Tensor, **kw: Any) -> Outcome:
    """``request`` on the prepared ``model`` and inputs ``x``, patch by patch if it has a patch.

    ``kw`` are :func:`esegeta.call.call_once`'s: ``base_dir``, ``samples``, ``with_scores``."""
    return patcher.strategy(request.patch)(call_once, request, model, x, **kw)


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
    Returns the upstream result as float32 with the batch dimension kept, computed without
    TF32. The model is not modified: the method runs on a prepared copy (cached while the
    weights are unchanged).
    """
    request = from_arguments(method, target=target, wrapper=wrapper, layer=layer, noise_tunnel=noise_tunnel,
                             patch=patch, params=params)
    check_method(method, params, layer, dict(noise_tunnel) if noise_tunnel is not None else None, "explain")
    if not torch.is_tensor(inputs) or inputs.ndim < 3:
        raise ConfigError("inputs", "inputs must be a tensor (batch, channels, *spatial)")
    device = next((p.device for p in model.parameters()), inputs.device)
    x = inputs.detach().to(device=device, dtype=torch.float32)  # the caller's tensor keeps requires_grad as it was
    # the prepared copy counts module calls on one forward: with patches, on a patch-sized crop
    example = x if request.patch is None else x[(slice(None), slice(None)) + tuple(slice(0, s) for s in request.patch.size)]
    with numerics.fp32_numerics():
        ready = prepared(model, example)
        refuse(request.spec, ready, example, "explain.method", layer=layer, params=request.params, wrapper=wrapper)
        return run(request, ready, x, samples=x).result
