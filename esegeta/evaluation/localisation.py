"""Localisation metrics: does the attribution fall on the ground-truth mask? (No forward pass.)

The mask comes from the context, (B, 1|C, *S) bool: a label file, or a segmentation wrapper's
frozen mask. The attribution is summed over its channels and the mask taken as any of its
channels, so both are compared per pixel (voxel). An input whose mask is empty scores NaN.
"""
from __future__ import annotations

import dataclasses

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from esegeta.errors import ConfigError
from esegeta.evaluation.base import Context, MetricResult, MetricSpec, Rule, keyword_defaults, register


def _flat(ctx: Context, attribution: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N) channel-summed attribution and (B, N) bool mask on the attribution's device."""
    mask = ctx.mask.to(attribution.device)
    if mask.dim() == attribution.dim() - 1:
        mask = mask.unsqueeze(1)
    if mask.shape[0] != attribution.shape[0] or mask.shape[2:] != attribution.shape[2:]:
        raise ConfigError("evaluation.mask", f"mask of shape {tuple(mask.shape)} does not match the attribution "
                          f"{tuple(attribution.shape)}; a mask needs the input's batch and spatial size")
    b = attribution.shape[0]
    return attribution.sum(1).reshape(b, -1), (mask != 0).any(1).reshape(b, -1)


def _nan_where_empty(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.any(-1), values, torch.full_like(values, float("nan")))


def dilate(mask: Tensor, radius: float) -> Tensor:
    """(B, 1, *S) bool mask grown by a Euclidean ball of ``radius`` voxels."""
    if radius <= 0:
        return mask
    r = int(math.floor(radius))
    dims = mask.dim() - 2
    grids = torch.meshgrid(*[torch.arange(-r, r + 1, device=mask.device, dtype=torch.float32)] * dims, indexing="ij")
    ball = (sum(g**2 for g in grids) <= radius**2).to(torch.float32)[None, None]
    conv = F.conv2d if dims == 2 else F.conv3d
    return conv(mask.to(torch.float32), ball, padding=r) > 0


def pointing_game(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, tolerance: float = 0.0) -> MetricResult:
    """Pointing game (Zhang et al. 2018): 1 if a point of maximal attribution lies within
    ``tolerance`` pixels (voxels) of the mask, else 0 (the paper uses 15 pixels; 0 is Quantus's
    ``PointingGame``) (higher is better)."""
    a, mask = _flat(ctx, attribution)
    if tolerance:
        grown = dilate(mask.reshape(attribution.shape[0], 1, *attribution.shape[2:]), float(tolerance))
        grown = grown.reshape(mask.shape)
    else:
        grown = mask
    hit = ((a == a.max(-1, keepdim=True).values) & grown).any(-1).to(attribution.dtype)
    return MetricResult(_nan_where_empty(hit, mask))


def energy_pointing_game(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor) -> MetricResult:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM): the share of the positive attribution
    that falls within the mask (Quantus's ``AttributionLocalisation`` with positive attributions) (higher is better)."""
    a, mask = _flat(ctx, attribution)
    a = a.clamp(min=0)
    return MetricResult(_nan_where_empty((a * mask).sum(-1) / (a.sum(-1) + 1e-9), mask))


def relevance_mass_accuracy(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor) -> MetricResult:
    """Relevance mass accuracy (Arras et al. 2022): the attribution within the mask over the whole
    attribution (higher is better)."""
    a, mask = _flat(ctx, attribution)
    return MetricResult(_nan_where_empty((a * mask).sum(-1) / a.sum(-1), mask))


def relevance_rank_accuracy(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor) -> MetricResult:
    """Relevance rank accuracy (Arras et al. 2022): with K the mask's size, the share of the K most
    relevant pixels (voxels) that lie within the mask (higher is better)."""
    a, mask = _flat(ctx, attribution)
    order = torch.argsort(a, dim=-1, descending=True, stable=True)
    k = mask.sum(-1, keepdim=True)
    top = torch.arange(a.shape[1], device=a.device)[None] < k
    hits = (mask.gather(1, order) & top).sum(-1).to(attribution.dtype)
    return MetricResult(_nan_where_empty(hits / k.squeeze(1).clamp(min=1), mask))


def top_k_intersection(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, k: int = 1000) -> MetricResult:
    """Top-k intersection (Theiner et al. 2022): the share of the ``k`` most relevant pixels (voxels)
    that lie within the mask, ``k`` at most the input's size (higher is better)."""
    a, mask = _flat(ctx, attribution)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError("params.k", f"must be an integer >= 1, got {k!r}")
    k = min(k, a.shape[1])
    order = torch.argsort(a, dim=-1, descending=True, stable=True)[:, :k]
    return MetricResult(_nan_where_empty(mask.gather(1, order).to(attribution.dtype).mean(-1), mask))


_MASK = frozenset({"mask"})
#: What the localisation metrics' parameters accept (checked with the config, before a run).
RULES = {"tolerance": Rule("float", 0), "k": Rule("int", 1)}
for _spec in (
    MetricSpec("pointing_game", "localisation", "Zhang et al. 2018, Top-down Neural Attention by Excitation Backprop "
               "(IJCV)", pointing_game, keyword_defaults(pointing_game), needs=_MASK,
               summary="does the maximum of the attribution hit the mask (within a tolerance)?"),
    MetricSpec("energy_pointing_game", "localisation", "Wang et al. 2020, Score-CAM: Score-Weighted Visual "
               "Explanations for Convolutional Neural Networks (CVPR workshops)", energy_pointing_game, {}, needs=_MASK,
               summary="share of the positive attribution inside the mask"),
    MetricSpec("relevance_mass_accuracy", "localisation", "Arras, Osman, Samek 2022, CLEVR-XAI: A benchmark dataset for "
               "the ground truth evaluation of neural network explanations (Information Fusion)", relevance_mass_accuracy,
               {}, needs=_MASK, summary="share of the attribution inside the mask"),
    MetricSpec("relevance_rank_accuracy", "localisation", "Arras, Osman, Samek 2022, CLEVR-XAI: A benchmark dataset for "
               "the ground truth evaluation of neural network explanations (Information Fusion)", relevance_rank_accuracy,
               {}, needs=_MASK, summary="share of the mask-sized top of the attribution inside the mask"),
    MetricSpec("top_k_intersection", "localisation", "Theiner, Müller-Budack, Ewerth 2022, Interpretable Semantic Photo "
               "Geolocation (WACV)", top_k_intersection, keyword_defaults(top_k_intersection), needs=_MASK,
               summary="share of the k most relevant pixels inside the mask"),
):
    register(dataclasses.replace(_spec, rules=RULES))
