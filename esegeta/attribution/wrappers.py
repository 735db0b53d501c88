"""Wrappers: segmentation outputs ``(B, K, *spatial)`` as ``(B, K')`` scores.

Every classifier-oriented method then accepts a segmentation model. Masks come from the
prediction on the unperturbed input and are frozen (never recomputed in ``forward``);
scores are sums (or means) of the activated output over those masks, so they keep the
model output's gradient. One code path serves 2D and 3D: reductions run over
``range(2, ndim)``.

Built-in wrappers:

- ``threshold``: ``A = act(out)[:, channel]``, ``M = A > t`` (a number or ``"otsu"``),
  columns ``[sum(A·(1−M)), sum(A·M)]``;
- ``multiclass``: ``M_k = argmax_k A == k``, column ``k = sum(A_k·M_k)``;
- ``region``: a given mask ``R``, column ``k = sum(A_k·R)``;
- ``"file.py:callable"``: a custom wrapper, called as ``callable(output, **options)`` on the
  unperturbed output and returning a function (or module) from outputs to ``(B, K')``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esegeta.errors import ConfigError
from esegeta.spec.request import WrapperConfig, wrapper_config
from esegeta.io.loading import load_mask
from esegeta.io.loading import load_callable

ACTIVATIONS: Mapping[str, Callable[[], nn.Module]] = {
    "none": nn.Identity,
    "sigmoid": nn.Sigmoid,
    "softmax": lambda: nn.Softmax(dim=1),
}
BUILTIN = ("threshold", "multiclass", "region")


def select_output(output: Any, key: str | int | None = None) -> torch.Tensor:
    """The segmentation tensor inside a model output (tensor, dict, tuple or list).

    Without ``key``: a dict's ``"out"`` entry (torchvision's convention) or its only/first
    tensor; a sequence's first element.
    """
    if torch.is_tensor(output):
        return output
    if isinstance(output, Mapping):
        if key is None:
            key = "out" if "out" in output else next(iter(output))
        if key not in output:
            raise ConfigError("wrapper.output", f"model output has no key {key!r}; keys: {list(output)}")
        return select_output(output[key])
    if isinstance(output, Sequence) and not isinstance(output, str):
        index = 0 if key is None else key
        if not isinstance(index, int) or not -len(output) <= index < len(output):
            raise ConfigError("wrapper.output", f"model output is a sequence of {len(output)}; give an index")
        return select_output(output[index])
    raise ConfigError("wrapper.output", f"cannot find a tensor in a model output of type {type(output).__name__}")


class MaskSum(nn.Module):
    """``(B, K', *spatial)`` activated channels → ``(B, K')``: each column's sum (or mean) over its
    frozen mask. A linear map of the activated output, and a leaf module of its own so that LRP
    can give it a rule (ε: each pixel's relevance is its share ``A·M / score`` of the explained
    score, as for any linear layer); without one, LRP would start from the gradient ``M`` and the
    relevance would add up to the score times the mask's pixel count."""

    def __init__(self, masks: torch.Tensor, reduction: str = "sum"):
        super().__init__()
        self.register_buffer("masks", masks.detach().float().unsqueeze(0))
        self.reduction = reduction

    def forward(self, picked: torch.Tensor) -> torch.Tensor:
        weighted = picked * self.masks
        score = weighted.sum(dim=tuple(range(2, weighted.ndim)))
        if self.reduction == "mean":
            score = score / self.masks.sum(dim=tuple(range(2, self.masks.ndim))).clamp_min(1.0)
        return score


class MaskedScore(nn.Module):
    """``(B, K, *spatial)`` output → ``(B, K')``: column j = reduce(act(out)[:, channels[j]] · masks[j]).

    ``masks`` has shape ``(K', *spatial)`` and is a frozen buffer (of the :class:`MaskSum` leaf);
    ``reduction`` is ``sum`` or ``mean`` (divided by the mask's size).
    """

    def __init__(self, activation: str, channels: Sequence[int], masks: torch.Tensor,
                 reduction: str = "sum", output_key: str | int | None = None):
        super().__init__()
        self.activation = ACTIVATIONS[activation]()
        # both buffers on the masks' device: the device of the output they were frozen from
        self.register_buffer("channels", torch.as_tensor(list(channels), dtype=torch.long, device=masks.device))
        self.reduce = MaskSum(masks, reduction)
        self.reduction = reduction
        self.output_key = output_key

    @property
    def masks(self) -> torch.Tensor:
        """The frozen masks, ``(1, K', *spatial)``."""
        return self.reduce.masks

    def forward(self, output: Any) -> torch.Tensor:
        activated = self.activation(select_output(output, self.output_key))
        return self.reduce(activated.index_select(1, self.channels))


class WrappedModel(nn.Module):
    """``model`` followed by a score function: the classifier view of a segmenter.

    ``unperturbed`` holds the scores on the input the masks were frozen from, so the
    target can be checked without another forward pass.
    """

    def __init__(self, model: nn.Module, score: Callable[[Any], torch.Tensor],
                 unperturbed: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.score = score
        self.unperturbed = unperturbed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.model(x))


def otsu(values: torch.Tensor) -> float:
    """Otsu's threshold of ``values`` (scikit-image)."""
    from skimage.filters import threshold_otsu

    array = values.detach().float().cpu().numpy()
    if array.min() == array.max():
        return float(array.min())
    return float(threshold_otsu(array))


def _activated(output: Any, activation: str, key) -> torch.Tensor:
    tensor = select_output(output, key)
    if tensor.ndim < 3:
        raise ConfigError("wrapper", f"wrappers turn segmentation outputs (batch, channels, *spatial) into scores; "
                                     f"the model outputs shape {tuple(tensor.shape)}: remove the wrapper for a classifier")
    with torch.no_grad():
        return ACTIVATIONS[activation]()(tensor.float())


def threshold_score(output: Any, wrapper: WrapperConfig) -> MaskedScore:
    """The ``threshold`` wrapper's score, its mask frozen from ``output`` (batch of one)."""
    a = _activated(output, wrapper.activation, wrapper.output)
    channel = wrapper.channel
    if not 0 <= channel < a.shape[1]:
        raise ConfigError("wrapper.channel", f"channel {channel} does not exist; the output has {a.shape[1]} channels")
    a = a[0, channel]
    t = otsu(a) if wrapper.threshold == "otsu" else float(wrapper.threshold)
    mask = (a > t).float()
    return MaskedScore(wrapper.activation, [channel, channel], torch.stack([1 - mask, mask]), wrapper.reduction,
                       wrapper.output)


def multiclass_score(output: Any, wrapper: WrapperConfig) -> MaskedScore:
    """The ``multiclass`` wrapper's score: one column per class over its argmax region."""
    a = _activated(output, wrapper.activation, wrapper.output)[0]
    labels, classes = a.argmax(dim=0, keepdim=True), a.shape[0]
    del a  # masks (labels == k) written into one tensor: no per-class temporaries (3D volumes are large)
    masks = torch.zeros(classes, *labels.shape[1:], device=labels.device).scatter_(0, labels, 1.0)
    return MaskedScore(wrapper.activation, range(classes), masks, wrapper.reduction, wrapper.output)


def region_score(output: Any, mask: torch.Tensor, wrapper: WrapperConfig) -> MaskedScore:
    """The ``region`` wrapper's score: every channel summed over the given mask."""
    a = _activated(output, wrapper.activation, wrapper.output)[0]
    mask = mask.to(device=a.device, dtype=torch.float32)  # a mask given as a tensor may live anywhere
    while mask.ndim > a.ndim - 1:
        mask = mask[0]
    if tuple(mask.shape) != tuple(a.shape[1:]):
        raise ConfigError("wrapper.mask", f"mask shape {tuple(mask.shape)} does not match the output's spatial "
                                          f"shape {tuple(a.shape[1:])}")
    return MaskedScore(wrapper.activation, range(a.shape[0]), mask.expand(a.shape[0], *mask.shape).clone(),
                       wrapper.reduction, wrapper.output)


def region_mask(mask: Any, base_dir: Path | None, device: torch.device) -> torch.Tensor:
    """A region mask given as a file name (relative to ``base_dir``) or a tensor, on ``device``."""
    if isinstance(mask, (str, Path)):
        return load_mask(mask, base_dir, device=device)
    return torch.as_tensor(mask, device=device)


def build(model: nn.Module, x: torch.Tensor, wrapper: WrapperConfig | Mapping[str, Any],
          base_dir: Path | None = None, *, mask: torch.Tensor | None = None,
          evaluate: Callable[[Callable, Any], torch.Tensor] | None = None) -> WrappedModel:
    """Wrap ``model`` for the single input ``x`` (batch of one): masks frozen from ``model(x)``.

    ``wrapper`` is a :class:`esegeta.spec.request.WrapperConfig` (a mapping is validated into one);
    ``mask`` replaces a region wrapper's mask (the patcher's crop of it); ``evaluate(score, output)``
    computes the unperturbed scores (default ``score(output)``; the patcher sums a large output
    slab by slab)."""
    if x.shape[0] != 1:
        raise ValueError("wrapper masks are frozen per input: build one wrapper per input (batch of one)")
    wrapper = wrapper_config(wrapper)
    with torch.no_grad():
        output = model(x)
    if wrapper.name == "threshold":
        score = threshold_score(output, wrapper)
    elif wrapper.name == "multiclass":
        score = multiclass_score(output, wrapper)
    elif wrapper.name == "region":
        given = region_mask(wrapper.mask if mask is None else mask, base_dir, x.device)
        score = region_score(output, given, wrapper)
    else:
        score = _custom(wrapper, output, base_dir, load_callable(wrapper.name, base_dir, "wrapper.name"))
    with torch.no_grad():
        unperturbed = score(output) if evaluate is None or not isinstance(score, MaskedScore) else evaluate(score, output)
    return WrappedModel(model, score, unperturbed)


def _custom(wrapper: WrapperConfig, output: Any, base_dir: Path | None, factory: Any) -> Callable:
    """The score function a custom wrapper makes, checked once on the unperturbed ``output``:
    whatever goes wrong in the user's code is a ConfigError naming the wrapper."""
    where = "wrapper.options" if wrapper.options else "wrapper.name"
    if not callable(factory):
        raise ConfigError("wrapper.name", f"{wrapper.name!r} is a {type(factory).__name__}, not a callable that "
                                          "makes a wrapper")
    try:
        score = factory(output, **wrapper.options)
        with torch.no_grad():
            scores = score(output) if callable(score) else None
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 (the user's wrapper: report it, never a traceback)
        raise ConfigError(where, f"the custom wrapper {wrapper.name!r} failed: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not callable(score):
        raise ConfigError("wrapper.name", f"{wrapper.name!r} returned a {type(score).__name__}; a custom wrapper "
                                          "returns a function (or module) from outputs to (batch, K) scores")
    if not torch.is_tensor(scores) or scores.ndim != 2 or scores.shape[0] != output_batch(output):
        got = tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
        raise ConfigError("wrapper.name", f"the scores of {wrapper.name!r} are {got}; a wrapper's scores are "
                                          "(batch, K)")
    return score


def output_batch(output: Any) -> int | None:
    """The batch size of a model output (a tensor, or the first tensor inside one)."""
    if torch.is_tensor(output):
        return output.shape[0]
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    return next((output_batch(v) for v in values if output_batch(v) is not None), None)
