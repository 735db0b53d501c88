"""JSON shorthands for tensor-valued parameters shared by many methods.

Configs are JSON, while baselines and feature masks are tensors shaped like the input.
These helpers build them from short names so configs stay portable:

- baselines: a number, ``"zeros"``, ``"mean"`` (per-channel mean), ``"min"``,
  ``"blur"`` / ``"blur:SIGMA"`` (Gaussian blur over the spatial axes), or a list of those
  (a baseline *distribution*, stacked along the batch axis, for the Shap methods);
- feature masks: ``{"grid": [s1, s2(, s3)]}`` groups voxels into blocks of that size
  (one feature id per block, shared by all channels).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from esegeta.errors import ConfigError

BASELINE_NAMES = ("zeros", "mean", "min", "blur", "blur:SIGMA")


def _blur(x: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """scipy's Gaussian filter of ``x``'s values (so it needs values: not on ``meta``), put
    back on ``x``'s device and dtype."""
    from scipy.ndimage import gaussian_filter

    spatial = x.shape[2:]
    if sigma is None:
        sigma = max(1.0, min(spatial) / 16)
    sigmas = (0, 0) + (sigma,) * len(spatial)
    arr = gaussian_filter(x.detach().cpu().numpy(), sigma=sigmas, mode="nearest")
    return torch.as_tensor(np.ascontiguousarray(arr), dtype=x.dtype, device=x.device)


def named_baseline(name: str, x: torch.Tensor, path: str) -> torch.Tensor:
    """One baseline tensor shaped like ``x`` from its short name."""
    spatial = tuple(range(2, x.ndim))
    if name == "zeros":
        return torch.zeros_like(x)
    if name == "mean":
        return x.mean(dim=spatial, keepdim=True).expand_as(x).clone()
    if name == "min":
        return x.amin(dim=spatial, keepdim=True).expand_as(x).clone()
    if name == "blur" or name.startswith("blur:"):
        sigma = None
        if name.startswith("blur:"):
            try:
                sigma = float(name.split(":", 1)[1])
            except ValueError:
                raise ConfigError(path, f"bad blur sigma in {name!r}; write e.g. 'blur:3'") from None
        return _blur(x, sigma)
    raise ConfigError(path, f"unknown baseline {name!r}; use a number or one of {', '.join(BASELINE_NAMES)}")


def make_baselines(value: Any, x: torch.Tensor, path: str) -> Any:
    """Translate a JSON baseline into what upstream libraries accept (scalar or tensor)."""
    if isinstance(value, bool):
        raise ConfigError(path, "a baseline must be a number, a name or a list of names")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return named_baseline(value, x, path)
    if isinstance(value, list) and value:
        parts = [make_baselines(v, x, f"{path}[{i}]") for i, v in enumerate(value)]
        parts = [p if torch.is_tensor(p) else torch.full_like(x, p) for p in parts]
        return torch.cat(parts, dim=0)
    if isinstance(value, torch.Tensor):
        return value
    raise ConfigError(path, f"cannot use {value!r} as a baseline; use a number or one of {', '.join(BASELINE_NAMES)}")


def grid_mask(block: list[int], x: torch.Tensor, path: str) -> torch.Tensor:
    """Feature ids for blocks of size ``block`` over the spatial axes, shape (1, 1, *spatial)."""
    spatial = x.shape[2:]
    if len(block) != len(spatial) or not all(isinstance(b, int) and b > 0 for b in block):
        raise ConfigError(path, f"grid needs {len(spatial)} positive integers (one per spatial axis), got {block!r}")
    ids = torch.zeros(spatial, dtype=torch.long, device=x.device)
    stride = 1
    for axis in reversed(range(len(spatial))):
        n_blocks = -(-spatial[axis] // block[axis])
        coord = torch.arange(spatial[axis], device=x.device) // block[axis]
        shape = [1] * len(spatial)
        shape[axis] = spatial[axis]
        ids = ids + coord.view(shape) * stride
        stride *= n_blocks
    return ids.view(1, 1, *spatial)


def check_baseline(value: Any, path: str) -> None:
    """Raise ConfigError unless ``value`` is a valid JSON baseline (without building it), or a
    tensor (from Python: used as given, on the device it is on)."""
    if torch.is_tensor(value):
        return
    if isinstance(value, list) and value:
        for i, v in enumerate(value):
            check_baseline(v, f"{path}[{i}]")
    elif isinstance(value, str):
        if value.startswith("blur:"):
            try:
                float(value.split(":", 1)[1])
            except ValueError:
                raise ConfigError(path, f"bad blur sigma in {value!r}; write e.g. 'blur:3'") from None
        elif value not in BASELINE_NAMES:
            raise ConfigError(path, f"unknown baseline {value!r}; use a number or one of {', '.join(BASELINE_NAMES)}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"cannot use {value!r} as a baseline; use a number or one of {', '.join(BASELINE_NAMES)}")


def check_feature_mask(value: Any, path: str) -> None:
    """Raise ConfigError unless ``value`` is ``{"grid": [positive ints]}`` (or, from Python, a tensor)."""
    if torch.is_tensor(value):
        return
    grid = value.get("grid") if isinstance(value, dict) and set(value) == {"grid"} else None
    if not (isinstance(grid, list) and grid and all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                                                    for b in grid)):
        raise ConfigError(path, 'a feature mask is written {"grid": [block sizes per spatial axis]}')


def make_feature_mask(value: Any, x: torch.Tensor, path: str) -> Any:
    """Translate a JSON feature mask (``{"grid": [...]}``) into an integer tensor."""
    if isinstance(value, dict) and set(value) == {"grid"}:
        return grid_mask(value["grid"], x, f"{path}.grid")
    if isinstance(value, torch.Tensor):
        return value
    raise ConfigError(path, 'a feature mask is written {"grid": [block sizes per spatial axis]}')
