"""Patch-wise explanation of large 2D/3D inputs, on torchio's grid sampling.

A :class:`Grid` is torchio's ``GridSampler`` grid (its arithmetic: :func:`grid_locations`) over one
input (2D inputs are volumes of depth 1, as torchio works on ``(C, W, H, D)``); ``blend`` is the
aggregator's overlap mode
(``average``: equal weights; ``hann``: a Hann window per patch, then normalised).

- ``mode: "local"``: every patch is explained as an input of its own (a wrapper freezes
  its masks per patch; a region mask is cropped to the patch) and the patch results are
  blended by :class:`Blend`: the arithmetic of torchio's ``GridAggregator`` (tested equal
  to it), on the data's device (torchio's aggregator copies every batch to the CPU).
  Results at a layer's resolution are blended on the layer's grid: the patch locations are
  divided by the layer's stride (patch size / result size per axis), so patch size, overlap
  and input size must be multiples of it.
- ``mode: "global"``: the explained score is the wrapper's score of the whole-input
  prediction assembled by sliding-window inference (:class:`Stitched`: patch outputs
  blended with the same weights as torchio's aggregator), masks frozen on that prediction.
  Its forward runs the model patch by patch under ``no_grad``; its backward
  (:class:`_StitchFunction`) recomputes each patch with gradients and sends it its weighted
  share of the output gradient, so the activations held at any time are those of
  ``batch_size`` patches (times the method's own batch, e.g. Integrated Gradients' steps per
  ``internal_batch_size``), never the whole input's. With a built-in wrapper
  (:class:`_StitchedScore`, passed as the inner call's ``build_wrapper``) the score
  is also summed region by region: only the input, the stitched output (kept without a
  graph) and the input gradient exist at the whole input's size, times the method's batch;
  that is what grows with the input (``benchmarks/patcher.py``: Integrated Gradients on a
  volume 4x a 16³ patch per axis peaks at 1.6-1.8x the resident memory of one patch).

  Which methods run how in global mode: Integrated Gradients, Saliency, InputXGradient,
  SmoothGrad (``noise_tunnel`` ``smoothgrad``/``smoothgrad_sq`` around the last two),
  DeepLIFT, LRP (Captum's; zennit's LRP composites), zennit's Gradient and IntegratedGradients
  attributors and, where the patches tile the input, Occlusion run as esegeta's
  streamed algorithms (:mod:`esegeta.attribution.streamed`, with a built-in wrapper): window by
  window against :class:`StitchedColumn`, each step's input made per patch, added into one result
  volume, tested equal to Captum's call on the whole stitched model (LRP, which Captum refuses on
  the stitched model: to Captum's LRP on the whole input where the stitched prediction is the
  whole one). DeepLIFT and LRP call Captum per patch batch, seeded with the score's multipliers
  (relevance) on the blended output times the patch's blending weight. Where the patches tile the input
  (:attr:`Grid.separable`) the score is a sum over patches: a threshold (a number) or
  multiclass wrapper's masks are frozen patch by patch (:func:`_tiled_wrapper`), and nothing
  but the input, the result and the masks (a byte per voxel and column) exists at the volume's
  size. Where they overlap, one step's stitched output is held (its channels), turned in place
  into the score's gradient. Other gradient methods (GradientShap...) backpropagate patch by
  patch through the checkpointed backward; other perturbation methods (FeatureAblation,
  Shapley sampling, LIME, KernelSHAP; Occlusion on overlapping patches) call the stitched
  forward once per perturbation (patch by patch, no gradients); methods that hook the
  network's activations (DeepLiftShap, GuidedBackprop, Deconvolution; DeepLift with what the
  streamed algorithm does not cover) see one
  module call per patch batch in the forward and again in the recomputation, with the batch
  kept item-major so that DeepLift's (inputs, baselines) halves stay paired: tested equal to
  the unpatched result on a pointwise model (a method that hooks the wrapper's activation
  gets the plain whole-input graph of the score). Those hold whole-volume tensors per step
  (Captum's). Captum's LRP needs the streamed algorithm (it refuses a module called more than
  once): without a built-in wrapper it is refused (:func:`check_global`). Only
  input-resolution attributions are accepted (layer, neuron and feature-visualisation
  methods: use ``local``).

The blending in the stitched forward is differentiable code of its own (torchio's
aggregator works in place on CPU without gradients); tests check it equals torchio's.

The two modes are strategies (:class:`Local`, :class:`Global`; :class:`Whole` without a
patch) that wrap the inner call (:func:`esegeta.attribution.call.call_once`) the way Captum's
``NoiseTunnel`` wraps a method: :func:`strategy` picks one for a request's patch.

Devices: the grid is integer locations (no tensor); patches are sliced from the input where it lives,
and windows, weights, stitched outputs and blends are made on its device.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from esegeta.attribution import streamed
from esegeta.attribution.call import Outcome
from esegeta.errors import ConfigError
from esegeta.spec import params as params_mod
from esegeta.spec.registry import MethodSpec
from esegeta.spec.request import PatchConfig, Request, WrapperConfig
from esegeta.attribution.wrappers import (BUILTIN, MaskedScore, build, multiclass_score, region_mask, select_output,
                                          threshold_score)

#: The inner call a strategy wraps: :func:`esegeta.attribution.call.call_once`'s signature.
CallFn = Callable[..., Outcome]


def to_volume(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, C, H, W, 1)``; 3D inputs unchanged (torchio's 3 spatial axes)."""
    return x.unsqueeze(-1) if x.ndim == 4 else x


def from_volume(x: torch.Tensor, dims: int) -> torch.Tensor:
    """The inverse of :func:`to_volume` for a ``dims``-D input."""
    return x.squeeze(-1) if dims == 2 else x


@dataclass
class Grid:
    """Patch locations over a spatial shape, as torchio's ``GridSampler`` places them.

    ``size``/``overlap`` are per spatial axis of the input; a size larger than the input
    is clipped to it (with no overlap on that axis). ``locations`` rows are
    ``(i0, j0, k0, i1, j1, k1)`` on the volume view (depth 1 for 2D).
    """
    shape: tuple[int, int, int]
    size: tuple[int, int, int]
    overlap: tuple[int, int, int]
    blend: str
    locations: np.ndarray

    @classmethod
    def over(cls, spatial: tuple[int, ...], size: list[int], overlap: list[int] | None, blend: str) -> Grid:
        if len(size) != len(spatial):
            raise ConfigError("patch.size", f"needs {len(spatial)} sizes for a {len(spatial)}D input, got {size}")
        overlap = list(overlap) if overlap else [0] * len(spatial)
        clipped = [min(s, n) for s, n in zip(size, spatial)]
        overlap = [o if o < s else 0 for o, s in zip(overlap, clipped)]
        if any(o % 2 for o in overlap):  # torchio's condition: half the overlap on each side of a patch
            raise ConfigError("patch.overlap", f"torchio's grid needs even overlaps, not {overlap}: e.g. "
                                               f"{[o - o % 2 for o in overlap]}")
        pad = (1,) * (3 - len(spatial))
        shape, size3, overlap3 = tuple(spatial) + pad, tuple(clipped) + pad, tuple(overlap) + (0,) * len(pad)
        return cls(shape, size3, overlap3, blend, grid_locations(shape, size3, overlap3))

    def slices(self, location: np.ndarray, scale: tuple[int, int, int] = (1, 1, 1)) -> tuple[slice, ...]:
        """Index of a patch in a ``(B, C, X, Y, Z)`` tensor (on a grid ``scale`` times coarser)."""
        return (slice(None), slice(None)) + tuple(slice(int(a) // s, int(b) // s)
                                                  for a, b, s in zip(location[:3], location[3:], scale))

    def window(self, scale: tuple[int, int, int] = (1, 1, 1), device: torch.device | str | None = None
               ) -> torch.Tensor:
        """A patch's blending weights on a grid ``scale`` times coarser, on ``device``: ones
        (average) or the Hann window torchio's aggregator uses."""
        size = tuple(p // s for p, s in zip(self.size, scale))
        if self.blend == "hann":
            return hann_window(size, device)
        return torch.ones(size, device=device)

    def check_scale(self, scale: tuple[int, int, int]) -> None:
        """A ConfigError unless every patch falls on the grid ``scale`` times coarser than the input."""
        for location in self.locations:
            if any(int(v) % s for v, s in zip(location, scale + scale)):
                raise ConfigError("patch", f"the result is {scale} times coarser than the input, and patch "
                                           f"{location[:3].tolist()}–{location[3:].tolist()} does not fall on that "
                                           f"grid: choose input size, patch size and overlap multiples of {scale}")

    @property
    def separable(self) -> bool:
        """Whether the patches tile the input without overlap (every voxel in exactly one patch):
        then a voxel-wise score of the stitched prediction is a sum over patches. torchio shifts
        the last patch of an axis the patch size does not divide back inside, so that patch
        overlaps its neighbour even with ``overlap`` 0."""
        return int(np.prod(self.locations[:, 3:] - self.locations[:, :3], axis=1).sum()) == int(np.prod(self.shape))

    def chunks(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.locations), batch_size):
            yield self.locations[start:start + batch_size]


def grid_locations(shape: tuple[int, int, int], size: tuple[int, int, int], overlap: tuple[int, int, int]
                   ) -> np.ndarray:
    """torchio's ``GridSampler`` patch locations (``_get_patches_locations``: per axis every
    ``size − overlap`` voxels from 0, the last patch shifted back inside; rows ``(i0, j0, k0, i1, j1,
    k1)`` sorted), computed here: importing torchio costs ~100 MiB resident (SimpleITK, pandas) for
    a few lines of arithmetic (``tests/test_patcher.py`` checks it equals torchio's)."""
    starts = []
    for n, s, o in zip(shape, size, overlap):
        axis = list(range(0, n + 1 - s, s - o))
        if axis[-1] != n - s:
            axis.append(n - s)
        starts.append(axis)
    first = np.unique(np.array(np.meshgrid(*starts)).reshape(3, -1).T, axis=0)
    return np.asarray(sorted(np.hstack((first, first + np.array(size))).tolist()), dtype=np.int64)


def first_patch(x: torch.Tensor, patch: PatchConfig | None) -> torch.Tensor:
    """``x`` cropped to its first patch (``x`` itself without a patch): what a pass that reads only
    the model's structure runs on (a forward pass on the whole volume is the memory patching is
    there to avoid; a fully convolutional model's structure is the same on a patch)."""
    if patch is None:
        return x
    return x[(slice(None), slice(None)) + tuple(slice(0, s) for s in patch.size)]


def hann_window(size: tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
    """torchio's n-d Hann window (``GridAggregator._get_hann_window``: the product of 1-d
    windows of ``n + 2`` points without their zero ends), made on ``device``."""
    window = torch.ones((1,) * len(size), device=device)
    for axis, n in enumerate(size):
        shape = [1] * len(size)
        shape[axis] = n
        window = window * torch.hann_window(n + 2, periodic=False, device=device)[1:-1].view(shape)
    return window


class Blend:
    """Local mode's blending of patch results ``(P, K, *patch)`` into one ``(K, *shape)`` map,
    ``Σ w·patch / Σ w`` per voxel with ``w`` the grid's window: the arithmetic of torchio's
    ``GridAggregator`` (``average``: ``w = 1``; ``hann``), on the device of the first results
    (``scale``: results that many times coarser than the input per axis)."""

    def __init__(self, grid: Grid, scale: tuple[int, int, int], like: torch.Tensor):
        grid.check_scale(scale)
        self.grid, self.scale = grid, scale
        self.window = grid.window(scale, like.device)
        shape = tuple(n // s for n, s in zip(grid.shape, scale))
        self.total = torch.zeros(like.shape[1], *shape, dtype=like.dtype, device=like.device)
        self.weight = torch.zeros(shape, dtype=self.window.dtype, device=like.device)

    def add(self, results: torch.Tensor, locations: np.ndarray) -> None:
        """Add the results ``(P, K, *patch)`` of the patches at ``locations`` (input grid)."""
        for result, location in zip(results, locations):
            region = self.grid.slices(location, self.scale)[2:]
            self.total[(slice(None),) + region] += result * self.window
            self.weight[region] += self.window

    def output(self) -> torch.Tensor:
        return self.total / self.weight


def _patches(x5: torch.Tensor, grid: Grid, locations: np.ndarray) -> torch.Tensor:
    """The patches of every item of ``x5``, item-major: ``(B * len(locations), C, *size)``, so a
    method that splits its batch in halves (DeepLift: inputs, then baselines) still can."""
    return torch.stack([x5[grid.slices(loc)] for loc in locations], 1).flatten(0, 1)


def _per_patch(y: torch.Tensor, n_patches: int) -> torch.Tensor:
    """``(B * P, K, *size)`` item-major → ``(P, B, K, *size)``."""
    return y.unflatten(0, (-1, n_patches)).transpose(0, 1)


def _scale(grid: Grid, result: torch.Tensor) -> tuple[int, int, int]:
    """How many input voxels one result voxel covers per axis (1 at input resolution)."""
    spatial = tuple(result.shape[2:])
    if len(spatial) != 3 or any(p % r for p, r in zip(grid.size, spatial)):
        raise ConfigError("patch", f"a patch of size {list(grid.size)} gave a result of shape {list(result.shape)}, "
                                   "not on a grid aligned with the patch: this method cannot be patched")
    return tuple(p // r for p, r in zip(grid.size, spatial))


class Stitched(nn.Module):
    """Sliding-window inference: ``model`` run patch by patch, outputs blended into one prediction.

    The blend is ``Σ_j w_j · out_j / Σ_j w_j`` over the patches ``j`` covering a voxel, with
    ``w`` the grid's window (torchio's ``average`` or ``hann``). Gradients flow through
    :class:`_StitchFunction`, which recomputes the patches one batch at a time.
    """

    def __init__(self, model: nn.Module, grid: Grid, dims: int, batch_size: int, output_key: Any = None,
                 rows: int = 1):
        super().__init__()
        self.model = model
        self.grid = grid
        self.dims = dims
        self.batch_size = batch_size
        self.output_key = output_key
        #: the method's rows per step (its internal batch) that ``batch_size`` patches per call include
        self.rows = rows
        self._weights: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StitchFunction.apply(x, self)

    @staticmethod
    def build_wrapper(model: Stitched, x: torch.Tensor, wrapper: WrapperConfig,
                      base_dir: Path | None = None, tiled: bool = True) -> nn.Module:
        """The wrapper on the stitched prediction (masks frozen on it); a built-in wrapper's
        score is computed by :class:`_StitchedScore` without whole-input autograd graphs.
        ``tiled``: masks held per patch where patches tile the input (:func:`_tiled_wrapper`; its
        masked sum is no module, so a rule-based method that needs the wrapper's ``MaskSum``
        module, an LRP composite, passes False)."""
        if tiled and model.grid.separable and wrapper.name in ("threshold", "multiclass") \
                and wrapper.threshold != "otsu":
            return _tiled_wrapper(model, x, wrapper)
        thickness = int(model.grid.size[0])
        wrapped = build(model, x, wrapper, base_dir, evaluate=lambda score, out: _slab_score(score, out, thickness))
        if isinstance(wrapped.score, MaskedScore):
            wrapped.score.reduce.masks = _compact(wrapped.score.masks)
            return _StitchedScore(model, wrapped.score, wrapped.unperturbed)
        return wrapped

    def tiled_value(self, x: torch.Tensor, score: nn.Module) -> torch.Tensor:
        """A built-in wrapper's ``score`` of the stitched prediction on ``x`` when the patches tile
        the input: a sum over patches (no output at the volume's size); no gradients."""
        x5, total = to_volume(x), 0
        with torch.no_grad():
            for chunk in self.grid.chunks(self.batch_size):
                y = self.outputs(_patches(x5, self.grid, chunk))
                for loc, y_patch in zip(chunk, _per_patch(y, len(chunk))):
                    total = total + _region_sum(score, y_patch, self.grid.slices(loc))
        return total * _reduction(score)

    def weights(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch window, sum of windows over the volume), on ``device``."""
        if self._weights is None or self._weights[0].device != device:
            window = self.grid.window(device=device)
            total = torch.zeros(self.grid.shape, device=device)
            for loc in self.grid.locations:
                total[self.grid.slices(loc)[2:]] += window
            self._weights = (window, total)
        return self._weights

    def outputs(self, patches: torch.Tensor) -> torch.Tensor:
        """The model's segmentation output on a batch of volume-view patches, as a volume view."""
        out = select_output(self.model(from_volume(patches, self.dims)), self.output_key)
        out = to_volume(out)
        if tuple(out.shape[2:]) != tuple(patches.shape[2:]):
            raise ConfigError("patch.mode", f"global mode stitches outputs at the input's resolution; the model "
                                            f"maps a patch {list(patches.shape[2:])} to {list(out.shape[2:])}: "
                                            "use mode 'local'")
        return out

    def assemble(self, x: torch.Tensor) -> torch.Tensor:
        """The stitched prediction on ``x`` (no gradients kept)."""
        x5, n = to_volume(x), x.shape[0]
        window, total = self.weights(x.device)
        out = None
        # Module hooks (DeepLift, guided backprop...) set tensor hooks, which need a graph: then
        # each patch batch builds one, dropped at once. Patch batches are item-major (DeepLift's
        # halves: inputs, then baselines).
        graph = x.requires_grad and _hooked(self.model)
        with torch.no_grad():
            for chunk in self.grid.chunks(self.batch_size):
                with torch.set_grad_enabled(graph):
                    y = self.outputs(_patches(x5, self.grid, chunk).requires_grad_(graph)).detach()
                if out is None:
                    out = torch.zeros(n, y.shape[1], *self.grid.shape, dtype=y.dtype, device=y.device)
                for loc, y_patch in zip(chunk, _per_patch(y, len(chunk))):
                    out[self.grid.slices(loc)] += y_patch * window
            out /= total
        return from_volume(out, self.dims)

    def blended(self, inputs: Callable[[np.ndarray], torch.Tensor], rows: int, device: torch.device,
                patches_per_call: int) -> torch.Tensor:
        """The stitched prediction, as a volume view ``(rows, K, *shape)``, of an input given patch by
        patch: ``inputs(locations)`` is ``(P, rows, C, *size)`` (made on the fly: a scaled or noised
        input never exists at the volume's size)."""
        window, total = self.weights(device)
        out = None
        with torch.no_grad():
            for chunk in self.grid.chunks(max(1, patches_per_call // rows)):
                y = self.outputs(inputs(chunk).flatten(0, 1))
                if out is None:
                    out = torch.zeros(rows, y.shape[1], *self.grid.shape, dtype=y.dtype, device=y.device)
                for loc, y_patch in zip(chunk, y.unflatten(0, (len(chunk), rows))):
                    out[self.grid.slices(loc)] += y_patch * window
            out /= total
        return out

    def backprop(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """d(Σ grad_out · stitched(x))/dx, one patch batch at a time."""
        x5, g5 = to_volume(x.detach()), to_volume(grad_out)
        window, total = self.weights(x.device)
        grad = torch.zeros_like(x5)
        for chunk in self.grid.chunks(self.batch_size):
            patches = _patches(x5, self.grid, chunk).requires_grad_(True)
            share = torch.stack([g5[self.grid.slices(loc)] * (window / total[self.grid.slices(loc)[2:]])
                                 for loc in chunk], 1).flatten(0, 1)
            with torch.enable_grad():
                y = self.outputs(patches)
                (g,) = torch.autograd.grad(y, patches, share.to(y.dtype))
            for loc, g_patch in zip(chunk, _per_patch(g, len(chunk))):
                grad[self.grid.slices(loc)] += g_patch
        return from_volume(grad, self.dims)


    def score_backprop(self, x: torch.Tensor, out: torch.Tensor, score: nn.Module,
                       grad_score: torch.Tensor) -> torch.Tensor:
        """d(Σ grad_score · score(stitched(x)))/dx for a voxel-wise masked score, one patch batch
        at a time: the score's gradient w.r.t. the stitched output is taken on each patch's region."""
        x5, o5 = to_volume(x.detach()), to_volume(out)
        window, total = self.weights(x.device)
        grad = torch.zeros_like(x5)
        for chunk in self.grid.chunks(self.batch_size):
            shares = []
            for loc in chunk:
                region = self.grid.slices(loc)
                with torch.enable_grad():
                    o = o5[region].detach().requires_grad_(True)
                    s = _region_score(score, o, region)
                    (g,) = torch.autograd.grad(s, o, grad_score.to(s.dtype))
                shares.append(g * (window / total[region[2:]]))
            patches = _patches(x5, self.grid, chunk).requires_grad_(True)
            with torch.enable_grad():
                y = self.outputs(patches)
                (g,) = torch.autograd.grad(y, patches, torch.stack(shares, 1).flatten(0, 1).to(y.dtype))
            for loc, g_patch in zip(chunk, _per_patch(g, len(chunk))):
                grad[self.grid.slices(loc)] += g_patch
        return from_volume(grad, self.dims)


def _compact(masks: torch.Tensor) -> torch.Tensor:
    """Binary masks as one byte per voxel (four times less than float; products and sums promote
    back to float); other masks (a region wrapper's weights) unchanged."""
    if masks.device.type != "meta" and bool(((masks == 0) | (masks == 1)).all()):
        return masks.to(torch.uint8)
    return masks


def _tiled_wrapper(model: Stitched, x: torch.Tensor, wrapper: WrapperConfig) -> _StitchedScore:
    """A ``threshold`` (a number) or ``multiclass`` wrapper on the stitched prediction when the
    patches tile the input: each patch's masks are frozen from its own output (the wrapper's rule
    is voxel-wise and each voxel's prediction is one patch's) and kept per patch, one bit per voxel
    and column (:class:`_TiledScore`); the unperturbed scores are summed patch by patch: no output,
    activation or mask at the volume's size."""
    if x.shape[0] != 1:
        raise ValueError("wrapper masks are frozen per input: build one wrapper per input (batch of one)")
    x5, grid = to_volume(x), model.grid
    packed, score, sums = _PackedMasks(grid, model.dims), None, 0
    with torch.no_grad():
        for chunk in grid.chunks(model.batch_size):
            y = model.outputs(_patches(x5, grid, chunk))
            for loc, y_patch in zip(chunk, y):
                one = (threshold_score if wrapper.name == "threshold" else multiclass_score)(y_patch[None], wrapper)
                score = score or _TiledScore(one, packed)
                packed.put(grid.slices(loc), one.masks[0])
                picked = score.activation(select_output(y_patch[None], wrapper.output)).index_select(1, score.channels)
                sums = sums + (picked * one.masks).sum(dim=tuple(range(2, picked.ndim)))
    return _StitchedScore(model, score, sums * _reduction(score))


class _PackedMasks:
    """Binary masks ``(K', *spatial)`` of a grid whose patches tile the input, held patch by patch
    as one bit per voxel and column (a 512×512×300 volume's two columns: 19 MiB, not 600 as floats)."""

    def __init__(self, grid: Grid, dims: int):
        self.grid, self.dims = grid, dims
        self.bits: dict[tuple[int, ...], torch.Tensor] = {}
        self.sizes: torch.Tensor | float = 0  # voxels per column

    @staticmethod
    def _key(region: tuple[slice, ...]) -> tuple[int, ...]:
        return tuple(v for r in region[2:] for v in (r.start, r.stop))

    def put(self, region: tuple[slice, ...], masks: torch.Tensor) -> None:
        """Keep the masks ``(K', *size)`` of the patch at ``region`` (volume-view slices)."""
        flat = (masks > 0.5).flatten(1).to(torch.uint8)
        flat = nn.functional.pad(flat, (0, -flat.shape[1] % 8)).view(flat.shape[0], -1, 8)
        powers = 2 ** torch.arange(8, dtype=torch.uint8, device=masks.device)
        self.bits[self._key(region)] = (flat * powers).sum(-1, dtype=torch.uint8)
        self.sizes = self.sizes + masks.flatten(1).sum(1)

    def region(self, region: tuple[slice, ...]) -> torch.Tensor:
        """The masks of one patch, ``(1, K', *size)`` bytes."""
        bits = self.bits[self._key(region)]
        size = tuple(r.stop - r.start for r in region[2:])
        shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
        values = ((bits.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :int(np.prod(size))]
        return values.view(1, bits.shape[0], *size)

    def column(self, column: int) -> torch.Tensor:
        """One column's mask over the whole volume view, ``(*spatial)`` bytes."""
        out = None
        for location in self.grid.locations:
            region = self.grid.slices(location)
            values = self.region(region)[0, column]
            if out is None:
                out = torch.zeros(self.grid.shape, dtype=torch.uint8, device=values.device)
            out[region[2:]] = values
        return out

    def full(self) -> torch.Tensor:
        """Every column's mask, ``(1, K', *spatial)`` bytes (materialised on demand)."""
        return torch.stack([self.column(k) for k in range(len(self.sizes))])[None]


class _TiledScore(nn.Module):
    """A built-in wrapper's score (:class:`esegeta.attribution.wrappers.MaskedScore`'s arithmetic)
    whose masks are :class:`_PackedMasks`: read patch by patch (:func:`_masks_in`); ``masks``
    materialises them (bytes) for whoever needs the whole volume (evaluation's localisation, a
    method that takes the plain graph); ``column_mask`` gives one column (the record's mask)."""

    def __init__(self, template: nn.Module, packed: _PackedMasks):
        super().__init__()
        self.activation = template.activation
        self.register_buffer("channels", template.channels)
        self.reduction, self.output_key, self.packed = template.reduction, template.output_key, packed

    @property
    def masks(self) -> torch.Tensor:
        return self.packed.full()

    def column_mask(self, column: int) -> torch.Tensor:
        """One column's mask, the input's spatial shape, bytes."""
        return from_volume(self.packed.column(column), self.packed.dims)

    def forward(self, output: Any) -> torch.Tensor:
        # the activation called once (a method may hook it, as DeepLift does: one call per forward)
        activated = self.activation(to_volume(select_output(output, self.output_key))).index_select(1, self.channels)
        total = 0
        for region in map(self.packed.grid.slices, self.packed.grid.locations):
            weighted = activated[region] * self.packed.region(region)
            total = total + weighted.sum(dim=tuple(range(2, weighted.ndim)))
        return total * _reduction(self)


def _masks_in(score: nn.Module, region: tuple[slice, ...]) -> torch.Tensor:
    """A score's masks on ``region`` of the volume view, ``(1, K', *region)``."""
    if isinstance(score, _TiledScore):
        return score.packed.region(region)
    return to_volume(score.masks)[region]


def _region_score(score: nn.Module, out: torch.Tensor, region: tuple[slice, ...]) -> torch.Tensor:
    """A :class:`esegeta.attribution.wrappers.MaskedScore`'s value restricted to ``region`` of the volume
    view (``out`` is the output there): its voxel sum is the score's share of that region."""
    return _region_sum(score, out, region) * _reduction(score)


def _region_sum(score: nn.Module, out: torch.Tensor, region: tuple[slice, ...],
                columns: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over ``region`` of the activated output times the masks, per column (all, or ``columns``)."""
    masks, channels = _masks_in(score, region), score.channels
    if columns is not None:
        masks, channels = masks.index_select(1, columns), channels.index_select(0, columns)
    weighted = score.activation(out).index_select(1, channels) * masks
    return weighted.sum(dim=tuple(range(2, weighted.ndim)))


def _reduction(score: nn.Module, columns: torch.Tensor | None = None) -> torch.Tensor | float:
    """What a column's sum is multiplied by: 1, or one over its mask's size (``mean``)."""
    if score.reduction != "mean":
        return 1.0
    if isinstance(score, _TiledScore):
        sizes = score.packed.sizes[None]
    else:
        sizes = score.masks.sum(dim=tuple(range(2, score.masks.ndim)))
    sizes = sizes if columns is None else sizes.index_select(1, columns)
    return 1.0 / sizes.float().clamp_min(1.0)


def _slab_score(score: nn.Module, out: torch.Tensor, thickness: int) -> torch.Tensor:
    """The score of the whole stitched output, summed over slabs (no whole-input temporaries; masks
    held per patch: over the patches)."""
    if isinstance(score, _TiledScore):
        return score(out)
    o5 = to_volume(out)
    return sum(_region_score(score, o5[:, :, start:start + thickness], (slice(None), slice(None),
                                                                         slice(start, start + thickness)))
               for start in range(0, o5.shape[2], thickness))


class _StitchedScore(nn.Module):
    """A built-in wrapper's score (:class:`esegeta.attribution.wrappers.MaskedScore`) of the stitched
    prediction. The score is a sum over voxels, so its backward needs the stitched output
    (kept, without a graph) and, per patch, the score's gradient on that patch's region: the
    activation, masked product and their gradients never exist at the whole input's size."""

    def __init__(self, model: Stitched, score: nn.Module, unperturbed: torch.Tensor):
        super().__init__()
        self.model = model
        self.score = score
        self.unperturbed = unperturbed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _hooked(self.score):  # a method hooks the wrapper's activation (DeepLift): the plain graph
            return self.score(self.model(x))
        if self.model.grid.separable and not (torch.is_grad_enabled() and x.requires_grad):
            return self.model.tiled_value(x, self.score)
        return _StitchedScoreFunction.apply(x, self)


    def column(self, target: Any) -> StitchedColumn:
        """The explained column ``target`` (an index, or a one-element tensor), for esegeta's
        streamed methods (:mod:`esegeta.attribution.streamed`)."""
        return StitchedColumn(self.model, self.score, target)


class StitchedColumn:
    """One column of a built-in wrapper's score of the stitched prediction, window by window: what
    esegeta's streamed methods (:mod:`esegeta.attribution.streamed`) differentiate.

    :meth:`gradients` gives, patch batch by patch batch, the column's gradient with respect to the
    patches of an input that is itself given patch by patch (a scaled, noised or perturbed input
    is made per patch, never at the volume's size). Where the patches tile the input
    (:attr:`Grid.separable`) the score is a sum over patches, and each patch's gradient needs
    that patch alone. Where they overlap, the wrapper's activation acts on the blend, so the
    gradient with respect to the blended output is taken once per step from the stitched
    output (``rows × K`` channels at the volume's size, turned in place into that gradient)
    and each patch gets its weighted share (the arithmetic of :meth:`Stitched.score_backprop`)."""

    def __init__(self, stitched: Stitched, score: nn.Module, target: Any):
        self.stitched, self.grid, self.score = stitched, stitched.grid, score
        index = target.reshape(-1)[:1] if torch.is_tensor(target) else torch.tensor([int(target)])
        self.index = index.to(device=score.channels.device, dtype=torch.long)
        self.scale = _reduction(score, self.index)
        #: the output channel the column reads, ``(1,)``
        self.channel = score.channels.index_select(0, self.index)

    def mask(self, region: tuple[slice, ...]) -> torch.Tensor:
        """The column's frozen mask on ``region``, ``(1, 1, *region)``."""
        return _masks_in(self.score, region).index_select(1, self.index)

    @property
    def separable(self) -> bool:
        return self.grid.separable

    def rows(self, wanted: int) -> int:
        """Rows per step: the method's own where patches tile the input; one where they overlap
        (each row's stitched output is held at the volume's size), with as many more patches per call."""
        return max(1, wanted) if self.separable else 1

    def value(self, out: torch.Tensor, region: tuple[slice, ...]) -> torch.Tensor:
        """The column's share of ``region`` per row, for the output ``out`` there."""
        return (_region_sum(self.score, out, region, self.index) * self.scale)[:, 0]

    def values(self, locations: list[np.ndarray], patches: torch.Tensor) -> torch.Tensor:
        """The column's share of each patch's region, ``(P,)``, for the patches ``(P, C, *size)`` at
        ``locations`` (where patches tile the input their sum is the score); no gradients."""
        with torch.no_grad():
            y = self.stitched.outputs(patches)
            return torch.cat([self.value(y[i:i + 1], self.grid.slices(loc)) for i, loc in enumerate(locations)])

    def gradients(self, inputs: Callable[[np.ndarray], torch.Tensor], rows: int, device: torch.device
                  ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """For each patch batch, its locations and the column's gradient with respect to its
        patches, ``(P, rows, C, *size)``; ``inputs(locations)`` gives those patches, same shape."""
        per_call = max(1, self.stitched.batch_size // rows)
        shares = None if self.separable else self._output_gradient(inputs, rows, device)
        window = None if shares is None else self.stitched.weights(device)[0]
        for chunk in self.grid.chunks(per_call):
            patches = inputs(chunk).flatten(0, 1).detach().requires_grad_(True)
            with torch.enable_grad():
                y = self.stitched.outputs(patches).unflatten(0, (len(chunk), rows))
                if shares is None:
                    value = sum(self.value(y_patch, self.grid.slices(loc)).sum() for loc, y_patch in zip(chunk, y))
                    (grad,) = torch.autograd.grad(value, patches)
                else:
                    share = torch.stack([shares[self.grid.slices(loc)] * window for loc in chunk])
                    (grad,) = torch.autograd.grad(y, patches, share.to(y.dtype))
            yield chunk, grad.unflatten(0, (len(chunk), rows))

    def _output_gradient(self, inputs: Callable[[np.ndarray], torch.Tensor], rows: int,
                         device: torch.device) -> torch.Tensor:
        """∂column/∂(stitched output) ÷ the sum of windows, ``(rows, K, *shape)``: the stitched
        output of the step's input, overwritten slab by slab with that gradient."""
        out = self.stitched.blended(inputs, rows, device, self.stitched.batch_size)
        total = self.stitched.weights(device)[1]
        thickness = int(self.grid.size[0])
        for start in range(0, out.shape[2], thickness):
            slab = (slice(None), slice(None), slice(start, start + thickness))
            with torch.enable_grad():
                o = out[slab].clone().requires_grad_(True)
                (g,) = torch.autograd.grad(self.value(o, slab).sum(), o)
            out[slab] = g / total[slab[2:]]
        return out


def _hooked(module: nn.Module) -> bool:
    """Whether a method has set hooks on ``module`` or its submodules."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in module.modules())


class _StitchedScoreFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, wrapped: _StitchedScore) -> torch.Tensor:
        out = wrapped.model.assemble(x)
        ctx.save_for_backward(x)
        ctx.out, ctx.wrapped = out, wrapped
        return _slab_score(wrapped.score, out, int(wrapped.model.grid.size[0]))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_score: torch.Tensor):
        (x,) = ctx.saved_tensors
        wrapped = ctx.wrapped
        return wrapped.model.score_backprop(x, ctx.out, wrapped.score, grad_score), None


class _StitchFunction(torch.autograd.Function):
    """Stitched forward without a graph; backward recomputes each patch batch (checkpointing)."""
    @staticmethod
    def forward(ctx, x: torch.Tensor, stitched: Stitched) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.stitched = stitched
        return stitched.assemble(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        return ctx.stitched.backprop(x, grad_out), None


class Whole:
    """No patching: the inner call on the whole input."""

    def __call__(self, inner: CallFn, request: Request, model: nn.Module, x: torch.Tensor, **kw: Any) -> Outcome:
        return inner(request, model, x, **kw)


@dataclass(frozen=True)
class Local:
    """Each patch explained as an input of its own, the results blended (:class:`Blend`).

    A region mask is cropped to each patch (one patch per call then). There is one score per
    patch, so none is returned, nor extra outputs."""
    patch: PatchConfig

    def __call__(self, inner: CallFn, request: Request, model: nn.Module, x: torch.Tensor, *,
                 base_dir: Path | None = None, **kw: Any) -> Outcome:
        if request.spec.kind == "image":
            raise ConfigError("patch", f"{request.spec.id} draws an image of its own, not aligned with the input: "
                                       "remove 'patch'")
        grid = Grid.over(tuple(x.shape[2:]), list(self.patch.size), self.patch.overlap, self.patch.blend)
        wrapper = request.wrapper
        mask = region_mask(wrapper.mask, base_dir, x.device) if wrapper is not None and wrapper.mask is not None else None
        batch_size = 1 if mask is not None else self.patch.batch_size
        one = request.replace(patch=None)
        dims = x.ndim - 2
        results = []
        for i in range(x.shape[0]):
            x5 = to_volume(x[i:i + 1])
            blend = None
            for chunk in grid.chunks(batch_size):
                patches = from_volume(_patches(x5, grid, chunk), dims)
                crop = None if mask is None else _crop(mask, grid, chunk[0])
                attr = inner(one, model, patches, base_dir=base_dir, samples=patches,
                             build_wrapper=partial(build, mask=crop)).result
                attr5 = to_volume(attr) if attr.ndim == dims + 2 else attr
                if blend is None:
                    blend = Blend(grid, _scale(grid, attr5), attr5)
                blend.add(attr5, chunk)
            results.append(from_volume(blend.output()[None], dims))
        return Outcome(torch.cat(results))


def _crop(mask: torch.Tensor, grid: Grid, location: np.ndarray) -> torch.Tensor:
    """A region mask cropped to the patch at ``location``."""
    cropped = mask.reshape(grid.shape)[grid.slices(location)[2:]]
    return cropped.reshape(cropped.shape[:mask.ndim])


@dataclass(frozen=True)
class Global:
    """The wrapper's score of the stitched whole-input prediction (:class:`Stitched`), computed
    patch by patch; the score and extra outputs are those of the first input."""
    patch: PatchConfig

    def __call__(self, inner: CallFn, request: Request, model: nn.Module, x: torch.Tensor, **kw: Any) -> Outcome:
        grid = Grid.over(tuple(x.shape[2:]), list(self.patch.size), self.patch.overlap, self.patch.blend)
        check_global(request.spec, request.wrapper, noise_tunnel=request.noise_tunnel)
        one_row, rows = rows_one_at_a_time(request)
        stitched = Stitched(model, grid, x.ndim - 2, self.patch.batch_size * rows, request.wrapper.output, rows)
        # input-resolution attributions only (check_global): no layer to find on the stitched model;
        # gradient and path methods run as esegeta's streamed algorithms (esegeta.attribution.streamed)
        # LRP through its library (not streamed) needs the wrapper's masked-sum module and its rule
        # (each voxel its share of the score): the masks frozen on the stitched output, not per patch
        tiled = request.spec.axiom != "conservation" or streamed.covers(request.spec, request.params,
                                                                        request.noise_tunnel)
        run = partial(streamed.run, network=model, sample=first_patch(x[:1], self.patch))
        return inner(one_row.replace(patch=None, layer=None), stitched, x,
                     **{**kw, "build_wrapper": partial(Stitched.build_wrapper, tiled=tiled), "run": run})


def rows_one_at_a_time(request: Request) -> tuple[Request, int]:
    """The request with the method's internal batch parameters (its library's ``batch_params``:
    Captum's ``internal_batch_size``, ``nt_samples_batch_size``, ``perturbations_per_eval``...)
    set to one, and the number of rows one step of it sent through the model before.

    In global mode a row is a whole input: each row of a method's step holds a scaled input,
    a stitched output and an input gradient at the whole input's size, so Captum's
    ``internal_batch_size`` rows multiplied the volume-sized memory. One row at a time with
    ``rows`` times the patches per model call keeps the model's batch (the activations: one
    patch's peak) and holds the whole-input tensors once. The results are the same: these
    parameters only split the upstream's sums into chunks."""
    spec = request.spec
    rows = params_mod.effective_batch(spec, dict(request.params), request.noise_tunnel)
    params = dict(request.params)
    noise_tunnel = dict(request.noise_tunnel) if request.noise_tunnel is not None else None
    accepted = spec.parameters()
    nt_accepted = (spec.noise_tunnel_parameters() or {}) if noise_tunnel is not None else {}
    for name in spec.library.batch_params:
        if name in accepted:
            params[name] = 1
        elif name in nt_accepted:
            noise_tunnel[name] = 1
    return request.replace(params=params, noise_tunnel=noise_tunnel), rows


def strategy(patch: PatchConfig | None) -> Whole | Local | Global:
    """How a request with ``patch`` is computed around its upstream call."""
    if patch is None:
        return Whole()
    return Global(patch) if patch.mode == "global" else Local(patch)


def check_global(spec: MethodSpec, wrapper: Any, where: str = "patch.mode", noise_tunnel: Any = None) -> None:
    """A ConfigError unless ``spec`` (with ``noise_tunnel``) can explain a stitched, wrapped prediction."""
    if wrapper is None:
        raise ConfigError(where, "global mode explains a wrapper's score of the stitched segmentation: set a "
                                 "wrapper, or use mode 'local'")
    if spec.kind != "attribution":
        raise ConfigError(where, f"global mode runs input-resolution attributions; {spec.id} is a {spec.kind} "
                                 "method: use mode 'local'")
    reason = streamed.STREAMED_ONLY.get(spec.id)
    if reason and getattr(wrapper, "name", None) not in BUILTIN:
        raise ConfigError(where, f"{spec.id} runs in global mode only as esegeta's streamed algorithm, with a "
                                 f"built-in wrapper ({', '.join(BUILTIN)}): {reason}; use mode 'local'")
    if reason and noise_tunnel is not None:
        raise ConfigError(where, f"{spec.id} runs in global mode only as esegeta's streamed algorithm, which takes "
                                 f"no noise tunnel: {reason}; use mode 'local' or drop noise_tunnel")
