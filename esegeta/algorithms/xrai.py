"""XRAI (Kapishnikov et al. 2019, "XRAI: Better Attributions Through Regions", ICCV, arXiv:1906.02825), in torch.

PAIR's ``saliency`` 0.2.1 (``saliency.core.XRAI``) on one channels-last numpy image: integrated
gradients from a black and a white baseline (the input's min and max, ``steps`` points each),
averaged and reduced over channels by max; then regions (Felzenszwalb at six scales on the image
resized to 224², scaled to [-1, 1], each segment dilated by a disk of ``dilation_rad``) are added
greedily by attribution density (``algorithm`` "full": the best gain among the remaining regions at
every step, until ``area_threshold``; "fast": in order of their own density); every pixel gets its
region's gain. Here the same steps run on tensors on the input's device; the segmentation is
scikit-image's, as upstream: 2D exactly upstream's, 3D SLIC supervoxels at ``n_segments`` 8, 16,
32, 64 and 128 (Felzenszwalb is 2D only), dilated by a ball. One input per call; result (B, 1, *spatial).
"""
from __future__ import annotations

import numpy as np
import torch

from esegeta.errors import ConfigError
from esegeta.spec.registry import Call

FELZENSZWALB_SCALES = (50, 100, 150, 250, 500, 1200)
FELZENSZWALB_SIGMA = 0.8
FELZENSZWALB_RESIZE = (224, 224)
FELZENSZWALB_MIN_SIZE = 150
#: The supervoxel counts of the 3D segmentation (one SLIC run each).
SLIC_SEGMENTS = (8, 16, 32, 64, 128)


def integrated_gradients(forward, x: torch.Tensor, baseline: torch.Tensor, column: int, steps: int,
                         batch_size: int) -> torch.Tensor:
    """saliency.core.IntegratedGradients: gradients at ``linspace(0, 1, steps)`` summed, times (x - baseline) / steps."""
    diff = x - baseline
    alphas = torch.linspace(0, 1, steps, dtype=torch.float64, device=x.device)
    total = torch.zeros_like(x)
    for start in range(0, steps, batch_size):
        points = torch.stack([(baseline.double() + a * diff.double()).to(x.dtype)
                              for a in alphas[start:start + batch_size]]).requires_grad_(True)
        with torch.enable_grad():
            out = forward(points)
            total += torch.autograd.grad(out[:, column].sum(), points)[0].sum(0)
    return total * diff / steps


def segments(x: torch.Tensor, dilation_rad: int) -> list[torch.Tensor]:
    """Boolean region masks of one input (C, *spatial): upstream's Felzenszwalb in 2D, SLIC supervoxels in 3D."""
    from skimage import segmentation
    from skimage.morphology import ball, dilation, disk
    from skimage.transform import resize

    image = np.moveaxis(x.detach().cpu().numpy(), 0, -1)  # channels last, in the input's dtype, as upstream
    low, high = -1.0, 1.0
    image = (image - np.min(image)) / (np.max(image) - np.min(image))
    image = image * (high - low) + low
    if x.ndim == 3:
        shape = image.shape[:2]
        small = resize(image, FELZENSZWALB_RESIZE, order=3, mode="constant", preserve_range=True, anti_aliasing=True)
        labels = [resize(segmentation.felzenszwalb(small, scale=s, sigma=FELZENSZWALB_SIGMA,
                                                   min_size=FELZENSZWALB_MIN_SIZE),
                         shape, order=0, preserve_range=True, mode="constant", anti_aliasing=False).astype(int)
                  for s in FELZENSZWALB_SCALES]
        footprint = disk(dilation_rad) if dilation_rad else None
    else:
        labels = [segmentation.slic(image, n_segments=n, channel_axis=-1, start_label=0) for n in SLIC_SEGMENTS]
        footprint = ball(dilation_rad) if dilation_rad else None
    masks = [seg == label for seg in labels for label in range(seg.min(), seg.max() + 1)]
    if footprint is not None:
        masks = [dilation(mask, footprint=footprint) for mask in masks]
    return [torch.as_tensor(np.asarray(m, dtype=bool), device=x.device) for m in masks]


def _gain(add: torch.Tensor, attr: torch.Tensor, base: torch.Tensor | None = None) -> float:
    added = add if base is None else add & ~base
    return float(attr[added].mean()) if bool(added.any()) else -float("inf")


def regions(attr: torch.Tensor, masks: list[torch.Tensor], area_threshold: float, min_pixel_diff: int,
            algorithm: str) -> torch.Tensor:
    """Upstream's ``_xrai`` ("full") and ``_xrai_fast`` ("fast"): every pixel gets its region's gain."""
    output = torch.full(attr.shape, -float("inf"), dtype=torch.float64, device=attr.device)
    current = torch.zeros(attr.shape, dtype=torch.bool, device=attr.device)
    if algorithm == "full":
        remaining = dict(enumerate(masks))
        area = 0.0
        while area <= area_threshold:
            best_gain, best_key, dropped = -float("inf"), None, []
            for key, mask in remaining.items():
                if int((mask & ~current).sum()) < min_pixel_diff:
                    dropped.append(key)
                    continue
                gain = _gain(mask, attr, current)
                if gain > best_gain:
                    best_gain, best_key = gain, key
            for key in dropped:
                del remaining[key]
            if not remaining:
                break
            added = remaining.pop(best_key)
            output[added & ~current] = best_gain
            current |= added
            area = float(current.double().mean())
    else:
        ranked = sorted(masks, key=lambda m: -_gain(m, attr))
        for added in ranked:
            diff = added & ~current
            if int(diff.sum()) < min_pixel_diff:
                continue
            output[diff] = _gain(diff, attr)
            current |= added
    uncomputed = output == -float("inf")
    output[uncomputed] = _gain(uncomputed, attr)
    return output


def xrai(call: Call, *, steps: int = 100, area_threshold: float = 1.0, algorithm: str = "full",
         min_pixel_diff: int = 50, dilation_rad: int = 5, batch_size: int = 1) -> torch.Tensor:
    """XRAI of ``call.forward``'s target score for each input, (B, 1, *spatial) float32."""
    if algorithm not in ("full", "fast"):
        raise ConfigError("params.algorithm", f"{algorithm!r} is not an XRAI algorithm: use 'full' or 'fast'")
    x = call.inputs.detach()
    target = call.targets
    classes = target.ints() if target is not None else None
    maps = []
    for i in range(x.shape[0]):
        one = x[i]
        if classes is not None:
            column = classes[i]
        else:
            with torch.no_grad():
                column = int(call.forward(one[None]).argmax(1))
        attrs = [integrated_gradients(call.forward, one, torch.full_like(one, float(v)), column, steps, batch_size)
                 for v in (one.min(), one.max())]
        attr = torch.stack(attrs).mean(0).amax(0)  # upstream: mean over baselines, max over channels
        maps.append(regions(attr, segments(one, dilation_rad), area_threshold, min_pixel_diff, algorithm))
    return torch.stack(maps).unsqueeze(1).to(x.dtype)
