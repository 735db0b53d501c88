"""Batched similarity of attribution maps (row-wise over flattened maps), for the randomisation metrics."""
from __future__ import annotations

import torch
from torch import Tensor

from esegeta.errors import ConfigError

SIMILARITIES = ("spearman", "pearson", "cosine", "ssim")


def average_ranks(values: Tensor) -> Tensor:
    """Ranks (1-based) along the last axis, ties sharing their average rank (as ``scipy.stats.rankdata``)."""
    ordered = values.sort(dim=-1).values
    low = torch.searchsorted(ordered.contiguous(), values.contiguous(), right=False)
    high = torch.searchsorted(ordered.contiguous(), values.contiguous(), right=True)
    return (low + high + 1).to(torch.float64 if values.dtype == torch.float64 else torch.float32) / 2


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation along the last axis (NaN where either side is constant)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def ssim(a: Tensor, b: Tensor, win_size: int = 7) -> Tensor:
    """(B,) mean structural similarity of the maps ``a`` and ``b`` (B, C, *S), channels summed, with
    a uniform ``win_size`` window (smaller on small maps), sample covariances, K1 = 0.01, K2 = 0.03
    and the data range of both maps together, over the windows inside the map: scikit-image's
    ``structural_similarity`` in 2D and 3D."""
    a, b = a.sum(1, keepdim=True), b.sum(1, keepdim=True)
    dims = a.dim() - 2
    win = min([win_size] + [s if s % 2 else s - 1 for s in a.shape[2:]])
    pool = torch.nn.functional.avg_pool2d if dims == 2 else torch.nn.functional.avg_pool3d
    both = torch.cat([a.flatten(1), b.flatten(1)], 1)
    data_range = (both.max(1).values - both.min(1).values).reshape((-1,) + (1,) * (dims + 1))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ua, ub = pool(a, win, stride=1), pool(b, win, stride=1)
    n = win**dims
    cov = n / (n - 1) if n > 1 else 1.0
    va = cov * (pool(a * a, win, stride=1) - ua * ua)
    vb = cov * (pool(b * b, win, stride=1) - ub * ub)
    vab = cov * (pool(a * b, win, stride=1) - ua * ub)
    s = ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua**2 + ub**2 + c1) * (va + vb + c2))
    return s.flatten(1).mean(1)


def similarity(a: Tensor, b: Tensor, kind: str = "spearman") -> Tensor:
    """(B,) similarity of the maps ``a`` and ``b`` (B, C, *S): rank (``spearman``) or linear
    (``pearson``) correlation or ``cosine`` of the flattened maps, or their :func:`ssim`."""
    if kind == "ssim":
        return ssim(a, b)
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if kind == "spearman":
        return pearson(average_ranks(a), average_ranks(b)).to(a.dtype)
    if kind == "pearson":
        return pearson(a, b)
    if kind == "cosine":
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)
    raise ConfigError("params.similarity", f"unknown similarity {kind!r}; valid: {', '.join(SIMILARITIES)}")
