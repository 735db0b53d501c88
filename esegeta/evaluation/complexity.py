"""Complexity metrics: how concentrated is an attribution? (No forward pass.)

The features are the attribution's elements (every channel of every pixel or voxel).
"""
from __future__ import annotations

import torch
from torch import Tensor

from esegeta.evaluation.base import Context, MetricResult, MetricSpec, keyword_defaults, register


def gini(values: Tensor) -> Tensor:
    """Gini index along the last axis of non-negative values (0: uniform; → 1: one feature)."""
    n = values.shape[-1]
    values = (values + 1e-7).sort(dim=-1).values
    ranks = 2 * torch.arange(1, n + 1, device=values.device, dtype=values.dtype) - n - 1
    return (ranks * values).sum(-1) / (n * values.sum(-1))


def sparseness(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, abs: bool = True) -> MetricResult:
    """Sparseness (Chalasani et al. 2020): the Gini index of the attribution's magnitudes, with a 1e-7
    offset as in Quantus's ``Sparseness`` (higher is better: fewer features carry the relevance)."""
    a = attribution.reshape(attribution.shape[0], -1)
    return MetricResult(gini(a.abs() if abs else a))


def complexity(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, abs: bool = True) -> MetricResult:
    """Complexity (Bhatt et al. 2020): the entropy of the attribution's fractional contributions
    |a_i| / sum |a| (lower is better: fewer features carry the relevance)."""
    a = attribution.reshape(attribution.shape[0], -1)
    a = a.abs() if abs else a
    p = a / a.abs().sum(-1, keepdim=True)
    return MetricResult(-(p * (p + 1e-12).log()).sum(-1))


register(MetricSpec("sparseness", "complexity", "Chalasani et al. 2020, Concise Explanations of Neural Networks using "
                    "Adversarial Training (ICML)", sparseness, keyword_defaults(sparseness), higher_is_better=True,
                    summary="Gini index of the attribution's magnitudes"))
register(MetricSpec("complexity", "complexity", "Bhatt, Weller, Moura 2020, Evaluating and Aggregating Feature-based "
                    "Model Explanations (IJCAI)", complexity, keyword_defaults(complexity), higher_is_better=False,
                    summary="entropy of the attribution's fractional contributions"))
