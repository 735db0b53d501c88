"""Explain a deep-supervision model: one that returns a list of outputs at several scales.

Config::

    "wrapper": {"name": "../wrappers/deep_supervision.py:fused",
                "options": {"channel": 0, "threshold": 0.5, "activation": "sigmoid",
                            "weights": [1.0, 0.5]}}

Every head is activated, resized to the largest head's resolution and averaged with
``weights`` (default: equal); the mask ``fused > threshold`` is frozen from the
unperturbed prediction. Columns: ``[sum(F·(1−M)), sum(F·M)]`` of the fused map ``F``,
exactly like the built-in ``threshold`` wrapper on a single-output model.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from esegeta.attribution.wrappers import ACTIVATIONS, MaskedScore


class FusedHeads(nn.Module):
    """Weighted mean of the activated heads at full resolution.

    Each head has its own activation module: DeepLift keeps per-module state, so one
    module applied to several heads would break it.
    """

    def __init__(self, activation: str, channel: int, weights: Sequence[float] | None, n_heads: int):
        super().__init__()
        self.activations = nn.ModuleList(ACTIVATIONS[activation]() for _ in range(n_heads))
        self.channel = channel
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, outputs) -> torch.Tensor:
        if torch.is_tensor(outputs):
            outputs = [outputs]
        size = max((o.shape[2:] for o in outputs), key=lambda s: torch.Size(s).numel())
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
        if len(outputs) != len(self.activations):
            raise ValueError(f"the model returned {len(outputs)} outputs, {len(self.activations)} when the mask was frozen")
        maps = [act(o)[:, self.channel:self.channel + 1] for act, o in zip(self.activations, outputs)]
        maps = [m if m.shape[2:] == size else F.interpolate(m, size=size, mode=mode, align_corners=False)
                for m in maps]
        weights = self.weights or [1.0] * len(maps)
        if len(weights) != len(maps):
            raise ValueError(f"{len(weights)} weights for {len(maps)} deep-supervision outputs")
        return sum(w * m for w, m in zip(weights, maps)) / sum(weights)


def fused(output, channel: int = 0, threshold: float = 0.5, activation: str = "sigmoid",
          weights: Sequence[float] | None = None, reduction: str = "sum") -> nn.Sequential:
    """Fuse the heads, then score the fused map with esegeta's masked score (as ``threshold``)."""
    n_heads = 1 if torch.is_tensor(output) else len(output)
    fuse = FusedHeads(activation, channel, weights, n_heads)
    with torch.no_grad():
        mask = (fuse(output)[0, 0] > threshold).float()
    return nn.Sequential(fuse, MaskedScore("none", [0, 0], torch.stack([1 - mask, mask]), reduction))
