"""Explain one connected component of a binary segmentation (a lesion, a vessel tree).

Config::

    "wrapper": {"name": "../wrappers/connected_component.py:component",
                "options": {"channel": 0, "threshold": 0.5, "activation": "sigmoid", "point": null}}

The foreground ``activation(out)[:, channel] > threshold`` of the unperturbed prediction
is split into connected components (``scipy.ndimage.label``, full connectivity); the
largest one, or the one containing ``point`` (voxel indices), is frozen as the mask.
Columns: ``[rest of the foreground, the component]``, so ``target: 1`` explains the
component and ``target: 0`` everything else the model segments.
"""
from __future__ import annotations

import numpy as np
import torch

from esegeta.attribution.wrappers import ACTIVATIONS, MaskedScore, select_output


def component(output, channel: int = 0, threshold: float = 0.5, activation: str = "sigmoid",
              reduction: str = "sum", point: list[int] | None = None, output_key=None) -> MaskedScore:
    from scipy import ndimage

    with torch.no_grad():
        a = ACTIVATIONS[activation]()(select_output(output, output_key).float())[0, channel]
    foreground = (a > threshold).cpu().numpy()
    labels, n = ndimage.label(foreground, structure=np.ones((3,) * foreground.ndim))
    if n == 0:
        raise ValueError(f"no foreground above threshold {threshold} in channel {channel}: nothing to explain")
    if point is not None:
        k = int(labels[tuple(point)])
        if k == 0:
            raise ValueError(f"point {point} is not inside a segmented component")
    else:
        k = int(np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    chosen = torch.from_numpy(labels == k).to(a.device)
    rest = torch.from_numpy(foreground).to(a.device) & ~chosen
    masks = torch.stack([rest, chosen]).float()
    return MaskedScore(activation, [channel, channel], masks, reduction, output_key)
