"""esegeta's methods as Quantus's ``explain_func``, so Quantus users can score any of them.

::

    import quantus
    from esegeta.evaluation.quantus import explain_func

    metric = quantus.Sparseness()
    scores = metric(model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=explain_func,
                    explain_func_kwargs={"method": "captum.IntegratedGradients", "n_steps": 32})

Quantus calls ``explain_func(model=..., inputs=..., targets=..., **explain_func_kwargs)`` with
numpy inputs, also on the randomised models of its randomisation metrics and the perturbed
inputs of its robustness metrics. ``method`` is an esegeta registry id; ``wrapper``, ``layer``,
``noise_tunnel`` and ``patch`` are :func:`esegeta.explain`'s; every other keyword is the
method's upstream parameter. ``device`` (Quantus adds it) moves the model's inputs there. The
result is float32 numpy (N, C|1, *S) on the inputs' grid (a layer map interpolated to it).

Quantus imports zennit, which imports torchvision: importing this module first makes that
import work where torchvision's compiled operators cannot load (:mod:`esegeta.compat`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from esegeta.compat import import_torchvision
from esegeta.attribution.explainer import explain
from esegeta.evaluation.scoring import as_input_attribution

try:
    import_torchvision()  # before Quantus (through zennit) imports it
except Exception:  # noqa: BLE001 (no torchvision: Quantus's own import reports it)
    pass


def explain_func(model: nn.Module, inputs: Any, targets: Any, *, method: str = "captum.Saliency",
                 device: str | torch.device | None = None, wrapper: Mapping[str, Any] | None = None,
                 layer: str | None = None, noise_tunnel: Mapping[str, Any] | None = None,
                 patch: Mapping[str, Any] | None = None, **params: Any) -> np.ndarray:
    """``method``'s attributions of ``inputs`` for ``targets`` (one class, or wrapped column, per
    input) as Quantus expects them; see the module docstring."""
    x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = x.to(device)
    if targets is None:
        targets = ["predicted"] * x.shape[0]
    wanted = np.asarray(targets).reshape(-1).tolist()
    if len(wanted) == 1:
        wanted = wanted * x.shape[0]
    out: list[torch.Tensor | None] = [None] * x.shape[0]
    for t in dict.fromkeys(wanted):
        rows = [i for i, v in enumerate(wanted) if v == t]
        attr = explain(model, x[rows], method, t if t == "predicted" else int(t), wrapper=wrapper, layer=layer,
                       noise_tunnel=noise_tunnel, patch=patch, **params)
        for n, i in enumerate(rows):
            out[i] = attr[n:n + 1]
    return as_input_attribution(torch.cat(out), x).detach().cpu().numpy()


__all__ = ["explain_func"]
