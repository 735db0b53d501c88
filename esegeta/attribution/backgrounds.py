"""Background data and superpixels for the perturbation and sampling methods (SHAP, LIME).

- background data (SHAP's ``data``): a baseline shorthand of :mod:`esegeta.attribution.baselines`
  (``"zeros"``, ``"mean"``, ``"min"``, ``"blur"``, ``"blur:SIGMA"``, a number), ``"samples"``
  (the run's inputs), a ``.npy``/``.pt`` file (relative to the config's folder, ``(N, C,
  *spatial)`` or ``(C, *spatial)``; ``.pt`` read with ``weights_only=True``), or a list of
  those, stacked along the batch axis;
- the glue between numpy images in channels-last layout (what SHAP's and LIME's model
  functions receive) and the model's ``(N, C, *spatial)`` tensors;
- supervoxels: scikit-image SLIC on a 2D image or a 3D volume, and painting one value per
  segment back onto the input grid.

Torch and scikit-image are imported inside the functions: importing this module is cheap.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from esegeta.errors import ConfigError
from esegeta.attribution.baselines import check_baseline
from esegeta.attribution.baselines import make_baselines
from esegeta.io.loading import read_array, resolve

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from esegeta.spec.registry import Call

DATA_FILE_SUFFIXES = (".npy", ".pt", ".pth")
DATA_NAMES = ("samples", "zeros", "mean", "min", "blur", "blur:SIGMA")


def check_data(value: Any, path: str) -> None:
    """Raise ConfigError unless ``value`` is a valid background (checked before anything runs)."""
    hint = (f"use a number, one of {', '.join(DATA_NAMES)}, a .npy/.pt file, or a list of those")
    if isinstance(value, list):
        if not value:
            raise ConfigError(path, f"an empty list is no background; {hint}")
        for i, v in enumerate(value):
            if isinstance(v, list):
                raise ConfigError(f"{path}[{i}]", f"lists do not nest; {hint}")
            check_data(v, f"{path}[{i}]")
    elif isinstance(value, str) and value.lower().endswith(DATA_FILE_SUFFIXES):
        return
    elif value == "samples":
        return
    else:
        try:
            check_baseline(value, path)
        except ConfigError:
            raise ConfigError(path, f"cannot use {value!r} as background data; {hint}") from None


def make_data(value: Any, x: torch.Tensor, call: Call, path: str) -> torch.Tensor:
    """The background batch ``(N, C, *spatial)`` for ``value`` when explaining ``x`` (one input)."""
    import torch


    if isinstance(value, list):
        return torch.cat([make_data(v, x, call, f"{path}[{i}]") for i, v in enumerate(value)])
    if value == "samples":
        data = call.samples if call.samples is not None else x
    elif isinstance(value, str) and value.lower().endswith(DATA_FILE_SUFFIXES):
        data = _load_data(value, x, call, path)  # on x's device
    else:
        data = make_baselines(value, x[:1], path)
        data = data if torch.is_tensor(data) else torch.full_like(x[:1], data)
    if tuple(data.shape[1:]) != tuple(x.shape[1:]):
        raise ConfigError(path, f"background of shape {tuple(data.shape)} does not fit inputs of shape "
                                f"{tuple(x.shape)}: it needs (N, {', '.join(map(str, x.shape[1:]))})")
    return data.detach().to(device=x.device, dtype=x.dtype)


def _load_data(value: str, x: torch.Tensor, call: Call, path: str) -> torch.Tensor:
    import torch


    file = resolve(value, call.base_dir)
    if not file.is_file():
        raise ConfigError(path, f"background file {file} does not exist (paths are relative to the config's folder)")
    try:
        array, _, _ = read_array(file)
    except ConfigError:
        raise
    except Exception as exc:  # unreadable, or a pickle that would run code
        raise ConfigError(path, f"cannot read {file.name} (plain arrays only): {type(exc).__name__}") from exc
    data = torch.as_tensor(array, dtype=torch.float32, device=x.device)
    return data[None] if data.ndim == x.ndim - 1 else data


def to_channels_last(x: torch.Tensor) -> np.ndarray:
    """``(N, C, *spatial)`` tensor → ``(N, *spatial, C)`` numpy array (float32)."""
    return x.detach().cpu().float().permute(0, *range(2, x.ndim), 1).numpy()


def numpy_model(forward: nn.Module, channels: int, device: Any, column: int | None = None
                ) -> Callable[[np.ndarray], np.ndarray]:
    """A model function for numpy batches ``(N, *spatial, c)`` → ``(N, K)`` scores (or ``(N,)`` for ``column``).

    ``c`` may be 3 where the model takes one channel (LIME's RGB view of a grayscale image:
    three identical channels, averaged back to one). Scores are the model's (wrapped) outputs
    as they are, without softmax.
    """
    import numpy as np
    import torch

    def f(batch: np.ndarray) -> np.ndarray:
        arr = np.asarray(batch, dtype=np.float32)
        if channels == 1 and arr.shape[-1] != 1:
            arr = arr.mean(axis=-1, keepdims=True)
        x = torch.as_tensor(np.ascontiguousarray(np.moveaxis(arr, -1, 1)), device=device)
        with torch.no_grad():
            scores = forward(x)
        scores = scores if column is None else scores[:, column]
        return scores.detach().cpu().double().numpy()

    return f


SLIC_FIXED = frozenset({"image", "mask", "channel_axis", "start_label"})


def slic_parameters() -> dict:
    """SLIC's keyword parameters a config may set (scikit-image's own names and defaults)."""
    import inspect

    from skimage.segmentation import slic

    return {n: p for n, p in inspect.signature(slic).parameters.items() if n not in SLIC_FIXED}


def for_segmentation(image: np.ndarray) -> np.ndarray:
    """``image`` min-max scaled to [0, 1] if it lies outside (for segmenting only: SLIC's and
    quickshift's RGB→Lab conversion and their default compactness/ratio assume [0, 1])."""
    low, high = float(image.min()), float(image.max())
    if low >= 0 and high <= 1:
        return image
    return (image - low) / ((high - low) or 1.0)


def supervoxels(x: torch.Tensor, **slic_kwargs: Any) -> np.ndarray:
    """SLIC segments of one input ``(1, C, *spatial)`` → integer labels ``(*spatial)`` from 0.

    2D and 3D alike: a one-channel input is segmented as a grey image/volume
    (``channel_axis=None``), a multi-channel one with its channels last; values outside
    [0, 1] are scaled for the segmentation (:func:`for_segmentation`).
    """
    from skimage.segmentation import slic

    image = to_channels_last(x)[0]
    if image.shape[-1] == 1:
        image, axis = image[..., 0], None
    else:
        axis = -1
    return slic(for_segmentation(image), channel_axis=axis, start_label=0, **slic_kwargs)


def paint(segments: np.ndarray, weights: dict[int, float] | np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """One value per segment painted onto the segments' grid → float32 ``(1, 1, *spatial)`` like ``like``.

    ``weights`` is an array indexed by segment id, or a mapping (missing segments get 0).
    """
    import numpy as np
    import torch

    if isinstance(weights, dict):
        table = np.zeros(int(segments.max()) + 1)
        for segment, weight in weights.items():
            table[int(segment)] = weight
    else:
        table = np.asarray(weights, dtype=np.float64)
    painted = table[segments].astype(np.float32)
    return torch.as_tensor(painted, device=like.device)[None, None]
