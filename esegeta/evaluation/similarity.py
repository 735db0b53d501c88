"""Batched similarity of attribution maps (row-wise over flattened maps), for the randomisation metrics."""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError

SIMILARITIES = ("spearman", "pearson", "cosine")


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


def similarity(a: Tensor, b: Tensor, kind: str = "spearman") -> Tensor:
    """(B,) similarity of the maps ``a`` and ``b`` (B, ...) flattened per row."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if kind == "spearman":
        return pearson(average_ranks(a), average_ranks(b)).to(a.dtype)
    if kind == "pearson":
        return pearson(a, b)
    if kind == "cosine":
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)
    raise ConfigError("params.similarity", f"unknown similarity {kind!r}; valid: {', '.join(SIMILARITIES)}")
