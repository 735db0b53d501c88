"""Blur Integrated Gradients (Xu et al. 2020, "Attribution in Scale and Space", arXiv:2004.03383), in torch, N-d.

PAIR's ``saliency`` 0.2.1 (``saliency.core.BlurIG``) integrates gradients along a path that
blurs the input with a Gaussian of growing ``sigma`` (0 … ``max_sigma`` in ``steps`` steps):
``-Σ_i (σ_{i+1} - σ_i) · (blur(x, σ_i + grad_step) - blur(x, σ_i)) / grad_step · ∇f(blur(x, σ_i))``.
It works on one channels-last numpy image and blurs its two spatial axes with SciPy
(``ndimage.gaussian_filter``, ``mode="constant"``); here the same filter (SciPy's kernel:
radius ``int(4σ + 0.5)``, zero padding) runs on every spatial axis of a batch of 2D or 3D
tensors, channels untouched, on the input's device. The parameters are upstream's;
``batch_size`` groups path points per model call. Upstream's batched loop weighs a whole batch
with the last step's σ difference (equal spacing makes it harmless; with ``sqrt`` it is not):
here each step gets its own difference, which is upstream's result at ``batch_size=1``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from esegeta.spec.registry import Call


def gaussian_kernel(sigma: float, like: torch.Tensor, truncate: float = 4.0) -> torch.Tensor:
    """SciPy's 1-D Gaussian weights (``ndimage._gaussian_kernel1d`` at order 0): radius ``int(truncate·σ + 0.5)``."""
    radius = int(truncate * sigma + 0.5)
    grid = torch.arange(-radius, radius + 1, device=like.device, dtype=torch.float64)
    weights = torch.exp(-0.5 / (sigma * sigma) * grid * grid)
    return (weights / weights.sum()).to(like.dtype)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` (B, C, *spatial) blurred along every spatial axis with zero padding (SciPy's ``mode="constant"``)."""
    if sigma == 0:
        return x
    kernel = gaussian_kernel(sigma, x)
    radius = (kernel.numel() - 1) // 2
    out = x
    for axis in range(2, x.ndim):
        moved = out.movedim(axis, -1)
        shape = moved.shape
        # SciPy correlates; the kernel is symmetric, so conv1d (a correlation) is the same
        flat = F.conv1d(moved.reshape(-1, 1, shape[-1]), kernel.view(1, 1, -1), padding=radius)
        out = flat.reshape(shape).movedim(-1, axis)
    return out


def blur_ig(call: Call, *, max_sigma: float = 50, steps: int = 100, grad_step: float = 0.01, sqrt: bool = False,
            batch_size: int = 1) -> torch.Tensor:
    """Blur IG of ``call.forward``'s target score with respect to ``call.inputs``, (B, C, *spatial)."""
    x = call.inputs.detach()
    target = call.targets
    if sqrt:
        sigmas = [math.sqrt(float(i) * max_sigma / float(steps)) for i in range(steps + 1)]
    else:
        sigmas = [float(i) * max_sigma / float(steps) for i in range(steps + 1)]
    total = torch.zeros_like(x)
    columns = torch.as_tensor(target.ints(), device=x.device) if target is not None else None
    for start in range(0, steps, batch_size):
        chunk = range(start, min(start + batch_size, steps))
        points = [gaussian_blur(x, sigmas[i]) for i in chunk]
        slopes = [(gaussian_blur(x, sigmas[i] + grad_step) - p) / grad_step for i, p in zip(chunk, points)]
        batch = torch.cat(points).requires_grad_(True)
        with torch.enable_grad():
            out = call.forward(batch)
            picked = out[torch.arange(out.shape[0], device=x.device),
                         columns.repeat(len(chunk)) if columns is not None else out.argmax(1)]
            grads = torch.autograd.grad(picked.sum(), batch)[0].split(x.shape[0])
        for i, slope, grad in zip(chunk, slopes, grads):
            total += (sigmas[i + 1] - sigmas[i]) * slope * grad
    return -total
