"""Guided Integrated Gradients (Kapishnikov et al. 2021, "Guided Integrated Gradients: an Adaptive Path
Method for Removing Noise", CVPR, arXiv:2106.09788), in torch, N-d.

PAIR's ``saliency`` 0.2.1 (``saliency.core.GuidedIG``) is numpy, one input at a time, and calls
``np.quantile(..., interpolation="lower")``, a keyword NumPy 2 removed (it raises there). This is
its ``guided_ig_impl`` step for step on tensors, float64 as upstream, on the input's device:
at each of ``x_steps`` steps the features with the smallest |gradient| (``fraction`` of them,
NumPy's "lower" quantile) move towards the input, never more than ``max_dist`` (relative L1)
away from the straight-line path. ``x_baseline``: null (zeros, upstream's default) or a number.
One input per call (upstream's rule); any spatial rank.
"""
from __future__ import annotations

import math

import torch

from esegeta.errors import ConfigError
from esegeta.spec.registry import Call

EPSILON = 1e-9


def _alpha_to_x(alpha: float, x_input: torch.Tensor, x_baseline: torch.Tensor) -> torch.Tensor:
    return x_baseline + (x_input - x_baseline) * alpha


def _lower_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``np.quantile(values, q, method="lower")``: the sorted value at ``floor(q · (n - 1))``."""
    flat = values.flatten()
    return torch.kthvalue(flat, int(math.floor(q * (flat.numel() - 1))) + 1).values


def guided_ig_impl(x_input: torch.Tensor, x_baseline: torch.Tensor, grad_func, steps: int = 200,
                   fraction: float = 0.25, max_dist: float = 0.02) -> torch.Tensor:
    """Upstream's ``guided_ig_impl`` on tensors (one input, float64)."""
    x_input, x_baseline = x_input.double(), x_baseline.double()
    x = x_baseline.clone()
    l1_total = float((x_input - x_baseline).abs().sum())
    attr = torch.zeros_like(x_input)
    if l1_total == 0:
        return attr
    for step in range(steps):
        grad_actual = grad_func(x).double()
        grad = grad_actual.clone()
        alpha = (step + 1.0) / steps
        alpha_min, alpha_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
        x_min = _alpha_to_x(alpha_min, x_input, x_baseline)
        x_max = _alpha_to_x(alpha_max, x_input, x_baseline)
        l1_target = l1_total * (1 - (step + 1) / steps)
        gamma = math.inf
        while gamma > 1.0:
            x_old = x.clone()
            moved = x_input - x_baseline
            x_alpha = torch.where(moved != 0, (x - x_baseline) / torch.where(moved != 0, moved, 1.0),
                                  torch.full_like(x, alpha_max))
            behind = x_alpha < alpha_min
            x[behind] = x_min[behind]
            l1_current = float((x - x_input).abs().sum())
            if math.isclose(l1_target, l1_current, rel_tol=EPSILON, abs_tol=EPSILON):
                attr += (x - x_old) * grad_actual
                break
            grad[x == x_max] = math.inf
            threshold = _lower_quantile(grad.abs(), fraction)
            s = (grad.abs() <= threshold) & (grad != math.inf)
            l1_s = float(((x - x_max).abs() * s).sum())
            gamma = (l1_current - l1_target) / l1_s if l1_s > 0 else math.inf
            if gamma > 1.0:
                x[s] = x_max[s]
            else:
                x[s] = _alpha_to_x(gamma, x_max, x)[s]
            attr += (x - x_old) * grad_actual
    return attr


def guided_ig(call: Call, *, x_baseline: float | None = None, x_steps: int = 200, fraction: float = 0.25,
              max_dist: float = 0.02) -> torch.Tensor:
    """Guided IG of ``call.forward``'s target score for each input, (B, C, *spatial) float32."""
    if x_baseline is not None and (isinstance(x_baseline, bool) or not isinstance(x_baseline, (int, float))):
        raise ConfigError("params.x_baseline", f"{x_baseline!r} is not a number: give null (zeros) or a number")
    if not 0 <= fraction <= 1 or not 0 <= max_dist <= 1:
        raise ConfigError("params.fraction" if not 0 <= fraction <= 1 else "params.max_dist", "give a number in [0, 1]")
    x = call.inputs.detach()
    target = call.targets
    classes = target.ints() if target is not None else None
    maps = []
    for i in range(x.shape[0]):
        def grad_func(point, i=i):
            with torch.enable_grad():
                one = point.to(x.dtype).unsqueeze(0).requires_grad_(True)
                out = call.forward(one)
                column = classes[i] if classes is not None else int(out.argmax(1))
                return torch.autograd.grad(out[0, column], one)[0][0]

        baseline = torch.full_like(x[i], float(x_baseline or 0.0))
        maps.append(guided_ig_impl(x[i], baseline, grad_func, x_steps, fraction, max_dist))
    return torch.stack(maps).to(x.dtype)
