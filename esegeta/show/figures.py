"""Figures of attributions, 2D and 3D, that show the numbers as they are.

matplotlib and captum are imported lazily, inside the functions that draw. Figures are built
with :class:`matplotlib.figure.Figure` directly (not through pyplot), so no backend is needed
or chosen (the process's, e.g. a notebook's, stays as it is), nothing is ever shown and no
global pyplot state accumulates; save them with :func:`esegeta.io.outputs.save_figure`.

Display modes (``method``)
--------------------------
* ``"map"`` (the default): the input beside the map drawn alone (never blended, so a bright
  input region cannot pass for a low value), in the result's own units: a colour bar of raw
  values, signed results in a diverging colour map centred at zero (red positive, blue
  negative), and any clipping of outliers (a percentile of ``|value|``, :func:`map_scale`)
  stated under the colour bar together with the true range. For a wrapped segmenter the outline
  of the frozen mask (the region whose score is explained) is drawn on both panels. 3D results
  show mid-slices and maximum-intensity projections along the three axes, with the same
  conventions.
* ``"heat_map"``, ``"blended_heat_map"``, ``"masked_image"``, ``"alpha_scaling"``: captum's
  ``visualize_image_attr`` modes, drawn by captum itself (values normalised to [-1, 1]).

Conventions
-----------
* Arrays are channel-first: an input image is ``(C, *spatial)``, an attribution
  ``(C', *spatial')`` where ``spatial'`` is the input's spatial shape or a coarser (layer)
  one (resampled for display, :func:`match_resolution`). Attributions are summed over
  channels first, which is what captum does itself for an (H, W, C) attribution.
* 3D volumes are shown as orthogonal 2D views (:func:`views_3d`).
"""
from __future__ import annotations

import contextlib
import io
import textwrap
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "METHODS",
    "CAPTUM_METHODS",
    "SIGNS",
    "DEFAULT_CLIP",
    "Scale",
    "map_scale",
    "input_figure",
    "map_figure",
    "result_caption",
    "to_display_image",
    "match_resolution",
    "views_3d",
    "attribution_figure",
    "overview_figure",
]

#: Visualisation modes of captum's ``visualize_image_attr`` supported here.
CAPTUM_METHODS = ("heat_map", "blended_heat_map", "masked_image", "alpha_scaling")
#: Every display mode: esegeta's ``map`` (raw units, centred at zero) and captum's.
METHODS = ("map",) + CAPTUM_METHODS
#: Default clipping of the colour range: this percentile of ``|value|`` (outliers saturate).
DEFAULT_CLIP = 99.5
#: Signs of captum's ``visualize_image_attr``.
SIGNS = ("all", "positive", "negative", "absolute_value")

_NEEDS_IMAGE = ("blended_heat_map", "masked_image", "alpha_scaling")
_UNSIGNED_ONLY = ("masked_image", "alpha_scaling")  # captum refuses sign='all'
_CELL_INCHES = 2.2
#: Overview panel size (inches at 100 dpi: 250 x 290 pixels), and the default panels per line.
CELL_WIDTH, CELL_HEIGHT, MAX_COLUMNS = 2.5, 3.5, 6
MASK_COLOR = "#000000"
#: Where the frozen mask is outlined: on the input and the map panels, on the input only, nowhere.
OUTLINES = ("all", "input", "none")


# --------------------------------------------------------------------------- #
# lazy imports
# --------------------------------------------------------------------------- #
@lru_cache(maxsize=1)
def _figure_class():
    """matplotlib's ``Figure`` that shows itself in Jupyter (``_repr_png_``, rendered with Agg
    by ``savefig``): inline display without pyplot and whatever the notebook's backend is."""
    from matplotlib.figure import Figure

    class NotebookFigure(Figure):
        """A :class:`matplotlib.figure.Figure` with ``_repr_png_`` (Jupyter shows it inline)."""

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=100)
            return buffer.getvalue()

    return NotebookFigure


def _new_figure(figsize: Tuple[float, float], layout: Optional[str] = None):
    """A figure of no backend's (not pyplot's): ``savefig`` renders it with Agg whatever
    backend the process uses, which is left as it is (a notebook keeps its own, and shows the
    figure inline through its ``_repr_png_``)."""
    return _figure_class()(figsize=figsize, layout=layout)


def _captum_visualize():
    """captum's ``visualize_image_attr``, always called with a figure and axis of ours and
    ``use_pyplot=False``: then it draws on them and never calls pyplot (importing its module
    imports pyplot, which chooses no backend by itself)."""
    from captum.attr import visualization as viz

    return viz.visualize_image_attr


# --------------------------------------------------------------------------- #
# array helpers
# --------------------------------------------------------------------------- #
def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # torch.Tensor
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _check_method_sign(method: str, sign: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if sign not in SIGNS:
        raise ValueError(f"unknown sign {sign!r}; expected one of {SIGNS}")


def _spatial_rank(array: np.ndarray, what: str) -> int:
    nd = array.ndim - 1
    if nd not in (2, 3):
        raise ValueError(
            f"{what} must be channel-first with 2 or 3 spatial axes, got shape {array.shape}"
        )
    return nd


def _as_channel_first(attr: Any, image: Optional[np.ndarray]) -> np.ndarray:
    """Lenient shape handling: add a missing channel axis, drop a batch axis of 1."""
    a = _to_numpy(attr)
    if image is not None:
        if a.ndim == image.ndim - 1:
            a = a[None]
        elif a.ndim == image.ndim + 1 and a.shape[0] == 1:
            a = a[0]
    elif a.ndim == 2:
        a = a[None]
    return a


def _finite(a: np.ndarray, dtype: Any = np.float64) -> Tuple[np.ndarray, bool]:
    """``a`` as ``dtype`` (a copy where it was another type) with non-finite values set to 0 (then
    a copy), and whether any were."""
    a = np.asarray(a, dtype=dtype)
    bad = ~np.isfinite(a)
    if bad.any():
        a = np.where(bad, 0.0, a).astype(dtype, copy=False)
        return a, True
    return a, False


def _working_type(a: np.ndarray) -> Any:
    """float32 for a float32 (or half) map, else float64: a volume's scale and sums in its own
    precision, not a float64 copy of twice its size (a 512×512×300 result: 300 MiB, not 600 per copy)."""
    return np.float32 if a.dtype in (np.float16, np.float32) else np.float64


def to_display_image(image: Any) -> np.ndarray:
    """Input tensor ``(C, *spatial)`` of any range -> float32 ``(C', *spatial)`` in [0, 1].

    Min-max normalisation over the whole array (a constant image becomes all
    zeros; non-finite values count as 0).  One channel stays one channel,
    three channels are kept as RGB, any other channel count is averaged into
    one channel.
    """
    img = _to_numpy(image)
    img, _ = _finite(img, _working_type(img))
    if img.ndim == 2:  # (H, W) without channel axis
        img = img[None]
    if img.ndim < 2:
        raise ValueError(f"image must be (C, *spatial), got shape {img.shape}")
    if img.shape[0] not in (1, 3):
        img = img.mean(axis=0, keepdims=True)
    lo, hi = float(img.min()), float(img.max())
    if hi > lo:
        img = (img - lo) / (hi - lo)
    else:
        img = np.zeros_like(img)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def match_resolution(attr: Any, spatial_shape: Sequence[int]) -> np.ndarray:
    """Resample ``attr`` ``(C', *s)`` to ``(C', *spatial_shape)`` for display.

    Linear / bilinear / trilinear interpolation with torch's
    ``align_corners=False`` convention (voxel centres of the coarse grid sit at
    the centres of the blocks of fine voxels they cover -- the same convention
    as :func:`esegeta.io.outputs.layer_affine`).  Returned unchanged (as float32)
    when the shape already matches.
    """
    a = np.asarray(_to_numpy(attr), dtype=np.float32)
    target = tuple(int(v) for v in spatial_shape)
    if tuple(a.shape[1:]) == target:
        return a
    nd = len(target)
    if a.ndim - 1 != nd:
        raise ValueError(
            f"attribution of shape {a.shape} cannot be resampled to spatial shape {target}"
        )
    modes = {1: "linear", 2: "bilinear", 3: "trilinear"}
    if nd not in modes:
        raise ValueError(f"match_resolution supports 1 to 3 spatial axes, got {nd}")
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(a))[None]
        out = F.interpolate(t, size=target, mode=modes[nd], align_corners=False)
    return out[0].numpy().astype(np.float32, copy=False)


def views_3d(
    volume: Any, projection: str = "mid", kind: str = "attribution", orient: bool = True
) -> List[np.ndarray]:
    """Three orthogonal 2D views ``(C, a, b)`` of a volume ``(C, X, Y, Z)``.

    View ``k`` removes spatial axis ``k`` (0: X, 1: Y, 2: Z -- the last one is
    the axial view for NIfTI-ordered data).

    ``projection='mid'``: the middle slice (index ``n // 2``).
    ``projection='mip'``: maximum-intensity projection along the axis.  For
    ``kind='attribution'`` it keeps, per pixel, the value with the largest
    absolute value (with its sign, so negative evidence is not lost); for
    ``kind='image'`` it is a plain maximum.

    With ``orient=True`` (default) each view is put in display orientation:
    the first remaining axis runs left to right and the second bottom to top
    (e.g. the axial view shows X horizontally and Y upwards, like a
    radiology viewer with ``origin='lower'``).  With ``orient=False`` the raw
    ``(C, first remaining axis, second remaining axis)`` arrays are returned.
    """
    vol = _to_numpy(volume)
    if vol.ndim != 4:
        raise ValueError(f"views_3d expects (C, X, Y, Z), got shape {vol.shape}")
    if projection not in ("mid", "mip"):
        raise ValueError(f"projection must be 'mid' or 'mip', got {projection!r}")
    if kind not in ("attribution", "image"):
        raise ValueError(f"kind must be 'attribution' or 'image', got {kind!r}")
    views = []
    for axis in (1, 2, 3):
        if projection == "mid":
            v = np.take(vol, vol.shape[axis] // 2, axis=axis)
        elif kind == "image":
            v = vol.max(axis=axis)
        else:
            mag = np.abs(vol)
            if np.issubdtype(mag.dtype, np.floating):
                mag = np.nan_to_num(mag, nan=-1.0, copy=False)  # mag is ours: no second volume
            idx = np.expand_dims(mag.argmax(axis=axis), axis)
            v = np.take_along_axis(vol, idx, axis=axis).squeeze(axis)
        if orient:
            v = np.flip(np.swapaxes(v, 1, 2), axis=1)
        views.append(np.ascontiguousarray(v))
    return views


_VIEW_AXES = ("x", "y", "z")


def _view_titles(projection: str) -> List[str]:
    if projection == "mip":
        return [f"MIP along {ax}" for ax in _VIEW_AXES]
    return [f"mid-slice {ax}" for ax in _VIEW_AXES]


# --------------------------------------------------------------------------- #
# panel drawing
# --------------------------------------------------------------------------- #
def _wrap(text: str, width: int, max_lines: int) -> str:
    lines = [line for part in str(text).split("\n") for line in (textwrap.wrap(part, width=width) or [""])]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, width - 1)] + "\u2026"
    return "\n".join(lines)


def _clean_axis(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _to_hwc_rgb(img_chw: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """(C, H, W) display image with C in {1, 3} -> (H, W, 3) float in [0, 1]."""
    if img_chw is None:
        return None
    hwc = np.moveaxis(np.asarray(img_chw, dtype=np.float64), 0, -1)
    if hwc.shape[-1] == 1:
        hwc = np.repeat(hwc, 3, axis=-1)
    return np.ascontiguousarray(hwc)


def _sign_filtered(a: np.ndarray, sign: str) -> np.ndarray:
    if sign == "positive":
        return np.maximum(a, 0)
    if sign == "negative":
        return np.minimum(a, 0)
    if sign == "absolute_value":
        return np.abs(a)
    return a


def _blank_cmap(sign: str):
    # Same default colour maps as captum, so a blank panel looks like "zero".
    from matplotlib.colors import LinearSegmentedColormap

    if sign == "all":
        return LinearSegmentedColormap.from_list("RdWhGn", ["red", "white", "green"]), -1, 1
    return {"positive": "Greens", "negative": "Reds", "absolute_value": "Blues"}[sign], 0, 1


def _draw_blank_map(fig, ax, img_hwc, method: str, sign: str, show_colorbar: bool) -> None:
    """What captum would draw for a normalised attribution that is all zero."""
    shape = img_hwc.shape[:2] if img_hwc is not None else None
    cmap, vmin, vmax = _blank_cmap(sign)
    mappable = None
    if method == "heat_map" or img_hwc is None:
        mappable = ax.imshow(np.zeros(shape or (1, 1)), cmap=cmap, vmin=vmin, vmax=vmax)
    elif method == "blended_heat_map":
        ax.imshow(img_hwc.mean(axis=2), cmap="gray", vmin=0, vmax=1)
        mappable = ax.imshow(np.zeros(shape), cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.5)
    elif method == "masked_image":
        ax.imshow(np.zeros(shape + (3,)))
    else:  # alpha_scaling: fully transparent image
        ax.imshow(np.concatenate([img_hwc, np.zeros(shape + (1,))], axis=2))
    _clean_axis(ax)
    if show_colorbar:
        from mpl_toolkits.axes_grid1 import make_axes_locatable

        cax = make_axes_locatable(ax).append_axes("bottom", size="5%", pad=0.1)
        if mappable is not None:
            fig.colorbar(mappable, orientation="horizontal", cax=cax)
        else:
            cax.axis("off")


def _draw_attr_panel(
    fig,
    ax,
    attr2d: np.ndarray,
    img_hwc: Optional[np.ndarray],
    method: str,
    sign: str,
    title: str,
    show_colorbar: bool,
    wrap_width: int = 40,
) -> None:
    """One 2D attribution panel (H, W) over an (H, W, 3) image, via captum."""
    notes: List[str] = []
    if img_hwc is None and method in _NEEDS_IMAGE:
        method = "heat_map"
        notes.append("no image: heat map")
    if sign == "all" and method in _UNSIGNED_ONLY:
        # captum cannot show signed values with these methods.
        sign = "absolute_value"
        notes.append("|attr| shown")
    a, had_nonfinite = _finite(attr2d)
    if had_nonfinite:
        notes.append("non-finite set to 0")
    if not np.any(_sign_filtered(a, sign)):
        notes.append("all zero" if not np.any(a) else f"no {sign} values")
        _draw_blank_map(fig, ax, img_hwc, method, sign, show_colorbar)
    else:
        visualize = _captum_visualize()
        with warnings.catch_warnings():
            # captum warns when the normalisation value is < 1e-5, which is
            # common for raw gradients; the picture is still correct.
            warnings.filterwarnings("ignore", message="Attempting to normalize by value")
            visualize(
                a,
                img_hwc,
                method=method,
                sign=sign,
                plt_fig_axis=(fig, ax),
                use_pyplot=False,
                show_colorbar=show_colorbar,
                title=None,
            )
        _clean_axis(ax)  # captum hides tick labels but keeps (costly) ticks
    full = title
    if notes:
        full = f"{title} ({'; '.join(notes)})" if title else "; ".join(notes)
    ax.set_title(_wrap(full, wrap_width, 3), fontsize=9)


def _draw_image_panel(ax, img_chw: Optional[np.ndarray], title: str, wrap_width: int = 40) -> None:
    """A display image (C in {1, 3}, H, W) in [0, 1], or an empty panel if None."""
    if img_chw is None:
        _draw_note_panel(ax, title, "no image", wrap_width)
        return
    if img_chw.shape[0] == 1:
        ax.imshow(img_chw[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.moveaxis(img_chw, 0, -1))
    _clean_axis(ax)
    ax.set_title(_wrap(title, wrap_width, 3), fontsize=9)


def _draw_note_panel(ax, title: str, note: str, wrap_width: int = 28) -> None:
    """A grey empty panel with a text note (e.g. a failed method)."""
    ax.set_facecolor("0.85")
    _clean_axis(ax)
    ax.text(
        0.5,
        0.5,
        _wrap(note or "no result", wrap_width, 8),
        ha="center",
        va="center",
        fontsize=7,
        color="0.2",
        transform=ax.transAxes,
        wrap=True,
    )
    ax.set_title(_wrap(title, wrap_width, 3), fontsize=9)


# --------------------------------------------------------------------------- #
# esegeta's map: raw units, centred at zero, clipping stated
# --------------------------------------------------------------------------- #
_SIGN_CMAPS = {"all": "RdBu_r", "positive": "Reds", "negative": "Blues_r", "absolute_value": "inferno"}
_SIGN_LABELS = {"all": "value", "positive": "value > 0", "negative": "value < 0", "absolute_value": "|value|"}


@dataclass(frozen=True)
class Scale:
    """How a map's values become colours: the colour map and its range (symmetric about zero
    for signed values), the colour bar's extension (arrows where values were clipped), its
    label and the note that states the true range and any clipping."""
    cmap: str
    vmin: float
    vmax: float
    extend: str
    label: str
    note: str
    clipped: bool = False

    @property
    def caption(self) -> str:
        return "\n".join([f"{self.label} (raw units)"] + self.note.split("; "))


def map_scale(values: Any, sign: str = "all", clip: Optional[float] = DEFAULT_CLIP) -> Tuple[np.ndarray, Scale]:
    """The values to draw (filtered by ``sign``, non-finite ones as 0) and their :class:`Scale`.

    The colour range ends at the ``clip`` percentile of ``|value|`` (over the non-zero values
    when most values are zero), so one outlier cannot turn the rest of the map blank; values
    beyond it saturate and the colour bar says so (``extend`` arrows and the note). ``clip=None``
    shows the full range. Signed values (``sign='all'``) use a diverging map centred at zero; a map
    with no negative value (Saliency, the Grad-CAM family) gets the sequential map of
    ``sign='positive'`` from zero instead, so its colours span the whole bar, not its upper half.
    """
    if sign not in SIGNS:
        raise ValueError(f"unknown sign {sign!r}; expected one of {SIGNS}")
    raw = _to_numpy(values)
    bad = int((~np.isfinite(raw)).sum()) if np.issubdtype(raw.dtype, np.inexact) else 0
    a, _ = _finite(raw, _working_type(raw))
    shown = _sign_filtered(a, sign)
    mag = np.abs(shown)
    top = float(mag.max()) if mag.size else 0.0
    limit = top
    if clip is not None and top > 0:
        limit = float(np.percentile(mag, clip, overwrite_input=True))  # reorders mag: no copy of the volume
        if limit <= 0:  # a sparse map: the percentile of its non-zero values
            limit = float(np.percentile(mag[mag > 0], clip))
        limit = limit if limit > 0 else top
    del mag
    clipped = limit < top
    notes = [f"{bad} non-finite shown as 0"] if bad else []
    if top == 0:
        notes.append("all zero" if not np.any(a) else f"no {sign} values")
        limit = 1.0
    if clipped:
        bound = {"all": "\u00b1", "negative": "-"}.get(sign, "") + f"{limit:.3g}"
        notes.append(f"clipped at {bound} ({clip:g}th pct of |value|)")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    notes.append(f"range [{lo:.3g}, {hi:.3g}]")
    drawn, label = sign, _SIGN_LABELS[sign]
    if sign == "all" and top > 0 and float(a.min()) >= 0:  # nothing negative: a sequential scale from zero
        drawn, label = "positive", "value (none < 0)"
    vmin, vmax = {"all": (-limit, limit), "negative": (-limit, 0.0)}.get(drawn, (0.0, limit))
    extend = {"all": "both", "negative": "min"}.get(drawn, "max") if clipped else "neither"
    scale = Scale(_SIGN_CMAPS[drawn], vmin, vmax, extend, label, "; ".join(notes), clipped)
    return (shown.astype(np.float32) if shown is raw else shown.astype(np.float32, copy=False)), scale


def _mask_array(mask: Any, spatial: Sequence[int]) -> Optional[np.ndarray]:
    """A mask ``(*spatial)`` or ``(1, *spatial)`` as float ``(1, *spatial)`` at ``spatial``, or None."""
    if mask is None:
        return None
    m = np.asarray(_to_numpy(mask), dtype=np.float32)
    while m.ndim > len(spatial) + 1 and m.shape[0] == 1:
        m = m[0]
    if m.ndim == len(spatial):
        m = m[None]
    if m.ndim != len(spatial) + 1:
        raise ValueError(f"mask of shape {m.shape} does not fit spatial shape {tuple(spatial)}")
    m = m[:1]
    if tuple(m.shape[1:]) != tuple(spatial):
        m = match_resolution(m, spatial)
    return (m > 0.5).astype(np.float32)


def _outline(ax, mask2d: Optional[np.ndarray]) -> None:
    """The outline of a 2D mask (the frozen region of a wrapped segmenter) on ``ax``."""
    if mask2d is None:
        return
    m = np.asarray(mask2d, dtype=np.float32)
    if m.ndim == 3:
        m = m[0]
    if m.min() == m.max():  # empty or everything: no edge to draw
        return
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    # thin black: it stands out from a red fundus and from both ends of a diverging map (green read as olive)
    ax.contour(m, levels=[0.5], colors=MASK_COLOR, linewidths=0.5, alpha=0.9)
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)


def _colorbar(fig, mappable, scale: Scale, axes, fontsize: float, width: int, shrink: float = 1.0) -> None:
    """A horizontal colour bar under ``axes`` (constrained layout makes room for its label)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    cb = fig.colorbar(mappable, ax=axes, orientation="horizontal", location="bottom", extend=scale.extend,
                      shrink=shrink, aspect=22 / shrink, pad=0.02, fraction=0.06)
    cb.ax.xaxis.set_major_locator(MaxNLocator(4, symmetric=scale.vmin < 0 < scale.vmax))
    cb.ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    cb.ax.tick_params(labelsize=fontsize - 1, length=2, pad=1)
    cb.set_label(_wrap(scale.caption, width, 4), fontsize=fontsize - 1, labelpad=2)


def _draw_map_panel(fig, ax, shown2d: np.ndarray, scale: Scale, title: str, mask2d: Optional[np.ndarray] = None,
                    colorbar: bool = True, fontsize: float = 8, width: int = 40) -> None:
    """One 2D map in raw units with its colour bar (below) and the mask outline."""
    im = ax.imshow(np.asarray(shown2d), cmap=scale.cmap, vmin=scale.vmin, vmax=scale.vmax, interpolation="nearest")
    _outline(ax, mask2d)
    _clean_axis(ax)
    ax.set_title(title, fontsize=fontsize)
    if colorbar:
        _colorbar(fig, im, scale, ax, fontsize, width)


def _view_pairs(arr: np.ndarray, kind: str) -> List[Tuple[str, np.ndarray]]:
    """(title, 2D view) pairs: the array itself in 2D; in 3D the mid-slices then the
    maximum-intensity projections along x, y and z (signed MIP for attributions)."""
    if arr.ndim - 1 == 2:
        return [("", arr)]
    mids = views_3d(arr, "mid", kind)
    mips = views_3d(arr, "mip", kind)
    return list(zip(_view_titles("mid") + _view_titles("mip"), mids + mips))


def _mask_views(mask: Optional[np.ndarray]) -> List[Optional[np.ndarray]]:
    if mask is None:
        return [None] * 6
    if mask.ndim - 1 == 2:
        return [mask]
    return views_3d(mask, "mid", "image") + views_3d(mask, "mip", "image")


def _map_data(attr: Any, image: Any, sign: str, clip: Optional[float]):
    """(display image or None, map (1, *spatial) as drawn, scale) of an attribution."""
    img = None if image is None else to_display_image(image)
    a = _as_channel_first(attr, None if image is None else _to_numpy(image))
    shown, scale = map_scale(_prepare_attr(a, img), sign, clip)
    return img, shown, scale


def _grid_caption(fig, title: str, caption: str) -> None:
    text = "\n".join(t for t in (title, caption) if t)
    if text:
        fig.suptitle(_wrap(text, 90, 4), fontsize=9)


def input_figure(image: Any, mask: Any = None, title: str = "", caption: str = ""):
    """The input (min-max normalised for display) with the outline of ``mask`` if given:
    one panel in 2D; in 3D mid-slices and maximum-intensity projections along x, y and z."""
    img = to_display_image(image)
    nd = _spatial_rank(img, "image")
    m = _mask_array(mask, img.shape[1:])
    pairs, masks = _view_pairs(img, "image"), _mask_views(m)
    if nd == 2:
        fig = _new_figure((3.0, 3.3 if caption else 3.1), "constrained")
        ax = fig.subplots(1, 1)
        _draw_image_panel(ax, pairs[0][1], title)
        _outline(ax, masks[0])
        if caption:
            ax.set_xlabel(_wrap(caption, 40, 3), fontsize=8)
    else:
        fig = _new_figure((3 * 2.4, 2 * 2.5 + 0.6), "constrained")
        axes = fig.subplots(2, 3).ravel()
        for ax, (t, v), mv in zip(axes, pairs, masks):
            _draw_image_panel(ax, v, t)
            _outline(ax, mv)
        _grid_caption(fig, title, caption)
    return fig


def map_figure(attr: Any, image: Any = None, sign: str = "all", clip: Optional[float] = DEFAULT_CLIP,
               mask: Any = None, title: str = "", caption: str = "", outline: str = "all"):
    """An attribution alone in raw units (:func:`map_scale`) with its colour bar, clipping stated,
    and the outline of ``mask``: one panel in 2D; in 3D mid-slices and maximum-intensity
    projections along x, y and z on one shared scale (one colour bar). ``image`` only sets the
    display resolution (a layer-resolution map is resampled to it). ``outline`` (:data:`OUTLINES`):
    other than ``'all'``, the map carries no outline."""
    img, shown, scale = _map_data(attr, image, sign, clip)
    m = _mask_array(mask, shown.shape[1:]) if outline == "all" else None
    pairs, masks = _view_pairs(shown, "attribution"), _mask_views(m)
    if len(pairs) == 1:
        fig = _new_figure((3.0, 3.9), "constrained")
        text = "\n".join(t for t in (_wrap(title, 40, 2), caption) if t)
        _draw_map_panel(fig, fig.subplots(1, 1), pairs[0][1][0], scale, text, masks[0], width=44)
        return fig
    fig = _new_figure((3 * 2.4, 2 * 2.5 + 1.3), "constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, (t, v), mv in zip(axes, pairs, masks):
        _draw_map_panel(fig, ax, v[0], scale, t, mv, colorbar=False)
    _grid_caption(fig, title, caption)
    _colorbar(fig, axes[0].images[0], scale, list(axes), 8, 90, shrink=0.6)
    return fig


def _map_attribution_figure(attr: Any, image: Any, sign: str, clip: Optional[float], mask: Any, title: str,
                            caption: str, outline: str = "all"):
    """Input and map side by side (2D), or input and map rows of mid-slices and MIPs (3D); the mask
    outlined on the panels ``outline`` names (:data:`OUTLINES`)."""
    img, shown, scale = _map_data(attr, image, sign, clip)
    if img is None:
        return map_figure(attr, None, sign, clip, mask, title, caption, outline)
    m = _mask_array(mask, img.shape[1:]) if outline != "none" else None
    maps, masks = _view_pairs(shown, "attribution"), _mask_views(m)
    on_map = masks if outline == "all" else [None] * len(masks)
    inputs = _view_pairs(img, "image")
    if len(maps) == 1:
        fig = _new_figure((6.0, 4.2), "constrained")
        ax_in, ax_map = fig.subplots(1, 2)
        _draw_image_panel(ax_in, inputs[0][1], "input" + (" (outline: frozen mask)" if m is not None else ""))
        _outline(ax_in, masks[0])
        _draw_map_panel(fig, ax_map, maps[0][1][0], scale, "map", on_map[0], width=44)
        _grid_caption(fig, title, caption)
        return fig
    fig = _new_figure((3 * 2.3, 4 * 2.3 + 1.4), "constrained")
    axes = fig.subplots(4, 3)
    for col in range(3):
        for row, (pairs, first) in enumerate(((inputs, 0), (maps, 0), (inputs, 3), (maps, 3))):
            t, v = pairs[first + col]
            ax = axes[row][col]
            if row % 2 == 0:
                _draw_image_panel(ax, v, f"input, {t}")
            else:
                _draw_map_panel(fig, ax, v[0], scale, f"map, {t}", colorbar=False)
            _outline(ax, (masks if row % 2 == 0 else on_map)[first + col])
    _grid_caption(fig, title, caption)
    _colorbar(fig, axes[1][0].images[0], scale, list(axes.ravel()), 8, 90, shrink=0.6)
    return fig


def result_caption(score: Any = None, target: Any = None, extra: str = "") -> str:
    """``score 0.123 · target 3`` (the explained value and its column), parts left out when absent."""
    parts = []
    if score is not None:
        try:
            parts.append(f"score {float(score):.4g}")
        except (TypeError, ValueError):
            parts.append(f"score {score}")
    if target is not None:
        parts.append(f"target {target}")
    if extra:
        parts.append(extra)
    return " \u00b7 ".join(parts)


# --------------------------------------------------------------------------- #
# public figures
# --------------------------------------------------------------------------- #
def _prepare_attr(attr: np.ndarray, img: Optional[np.ndarray]) -> np.ndarray:
    """Channel-summed float32 attribution (1, *spatial) at the image's resolution."""
    nd = _spatial_rank(attr, "attribution")
    a, _ = _finite(attr, _working_type(np.asarray(attr)))
    a = a.sum(axis=0, keepdims=True)
    if img is not None:
        if img.ndim - 1 != nd:
            raise ValueError(
                f"attribution {attr.shape} and image {img.shape} differ in spatial rank"
            )
        a = match_resolution(a, img.shape[1:])
    return np.asarray(a, dtype=np.float32)


def attribution_figure(
    attr: Any,
    image: Any = None,
    method: str = "map",
    sign: str = "all",
    title: str = "",
    projection: str = "mid",
    kind: Optional[str] = None,
    show_colorbar: bool = True,
    *,
    mask: Any = None,
    clip: Optional[float] = DEFAULT_CLIP,
    caption: str = "",
    outline: str = "all",
):
    """Figure of one attribution over its input.

    ``attr``: ``(C', *spatial)`` at the input's or at a coarser (layer) resolution (resampled
    for display with :func:`match_resolution`; summed over channels, as captum does).
    ``image``: the input ``(C, *spatial)`` in any range; ``mask``: the frozen mask of a wrapped
    segmenter (``(*spatial)``), outlined where ``outline`` says (:data:`OUTLINES`);
    ``caption``: e.g. :func:`result_caption`.

    ``method='map'`` (default): the input beside the map in raw units (:func:`map_scale`,
    ``clip``, ``sign``); 3D: mid-slices and maximum-intensity projections. Captum's modes: one
    panel drawn by ``visualize_image_attr`` with ``method`` / ``sign`` (3D: the three
    orthogonal views of :func:`views_3d`, ``projection`` 'mid' or 'mip').

    ``kind='image'`` (the default when ``image`` is None) shows ``attr`` as an image in its own
    right (min-max normalised), e.g. a feature visualisation that is not aligned with any
    input. ``kind='attribution'`` without an image draws the map (captum modes: a heat map).

    Special cases never raise: ``sign='all'`` with ``masked_image`` / ``alpha_scaling``
    (refused by captum) shows the absolute value; an attribution that is all zero (or has no
    values of the requested sign) is shown as a blank map with a note.
    """
    _check_method_sign(method, sign)
    img = None if image is None else to_display_image(image)
    kind = kind or ("image" if image is None else "attribution")
    if kind not in ("attribution", "image"):
        raise ValueError(f"kind must be 'attribution' or 'image', got {kind!r}")
    a = _as_channel_first(attr, None if image is None else _to_numpy(image))
    if kind == "image":
        return _image_figure(to_display_image(a), title, projection)
    if method == "map":
        return _map_attribution_figure(a, image, sign, clip, mask, title, caption, outline)
    fig = _attribution_panels(_prepare_attr(a, img), img, method, sign, title, projection, show_colorbar)
    return fig


def _image_figure(disp: np.ndarray, title: str, projection: str):
    """An array shown as an image of its own: one panel in 2D, three orthogonal views in 3D."""
    if _spatial_rank(disp, "image") == 2:
        fig = _new_figure((4.2, 4.5))
        _draw_image_panel(fig.subplots(1, 1), disp, title)
    else:
        fig = _new_figure((3 * 3.4, 3.9))
        axes = fig.subplots(1, 3)
        for ax, v, t in zip(axes, views_3d(disp, projection, "image"), _view_titles(projection)):
            _draw_image_panel(ax, v, t)
        if title:
            fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _attribution_panels(a: np.ndarray, img: Optional[np.ndarray], method: str, sign: str, title: str,
                        projection: str, show_colorbar: bool):
    """Captum's modes: one panel in 2D, three orthogonal views in 3D."""
    nd = a.ndim - 1
    if nd == 2:
        fig = _new_figure((4.2, 4.8 if show_colorbar else 4.5))
        ax = fig.subplots(1, 1)
        _draw_attr_panel(fig, ax, a[0], _to_hwc_rgb(img), method, sign, title, show_colorbar)
    else:
        fig = _new_figure((3 * 3.4, 4.2 if show_colorbar else 3.9))
        axes = fig.subplots(1, 3)
        a_views = views_3d(a, projection, "attribution")
        i_views = views_3d(img, projection, "image") if img is not None else [None] * 3
        for ax, av, iv, t in zip(axes, a_views, i_views, _view_titles(projection)):
            _draw_attr_panel(fig, ax, av[0], _to_hwc_rgb(iv), method, sign, t, show_colorbar)
        if title:
            fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _axial(arr_chw: Optional[np.ndarray], projection: str, kind: str) -> Optional[np.ndarray]:
    """2D arrays pass through; 3D ones give their last-axis (axial) view."""
    if arr_chw is not None and arr_chw.ndim - 1 == 3:
        return views_3d(arr_chw, projection, kind)[2]
    return arr_chw


_CELL_KEYS = ("label", "array", "note", "kind", "score", "target", "mask")


def _unpack_cell(cell: Any) -> dict:
    """A cell as a dict of :data:`_CELL_KEYS`: from a mapping, or ``(label, array, note[, kind])``."""
    if isinstance(cell, dict):
        unknown = set(cell) - set(_CELL_KEYS)
        if unknown:
            raise ValueError(f"overview cell has unknown keys {sorted(unknown)}; expected {_CELL_KEYS}")
        out = dict(cell)
    elif len(cell) in (3, 4):
        out = dict(zip(_CELL_KEYS, cell))
    else:
        raise ValueError(
            f"overview cell must be (label, array, note[, kind]), got {len(cell)} elements"
        )
    out["kind"] = out.get("kind") or "attribution"
    if out["kind"] not in ("attribution", "image"):
        raise ValueError(f"cell kind must be 'attribution' or 'image', got {out['kind']!r}")
    out["label"] = str(out.get("label", ""))
    out["note"] = "" if out.get("note") is None else str(out["note"])
    return out


def _draw_cell(fig, ax, cell: Any, image: Any, img: Optional[np.ndarray], img2d: Optional[np.ndarray],
               method: str, sign: str, projection: str, clip: Optional[float], width: int) -> None:
    """One overview cell: a note for a failed method, an image, or an attribution over the input;
    a cell that cannot be drawn shows the error instead of sinking the whole figure."""
    try:
        c = _unpack_cell(cell)
    except (ValueError, TypeError) as exc:
        _draw_note_panel(ax, "?", f"bad cell: {exc}", width)
        return
    label, arr, note = c["label"], c.get("array"), c["note"]
    title = _wrap(label, width, 2)
    caption = result_caption(c.get("score"), c.get("target"))
    if caption:
        title += "\n" + _wrap(caption, width, 1)
    try:
        if arr is None:
            _draw_note_panel(ax, title, note or "no result", width)
        elif c["kind"] == "image":
            disp = to_display_image(_as_channel_first(arr, None))
            _spatial_rank(disp, "image")
            _draw_image_panel(ax, _axial(disp, projection, "image"), title, width)
        else:
            a = _prepare_attr(_as_channel_first(arr, None if image is None else _to_numpy(image)), img)
            if note:
                title = f"{title}\n{_wrap(note, width, 1)}"
            if method == "map":
                shown, scale = map_scale(a, sign, clip)
                m = _mask_array(c.get("mask"), a.shape[1:])
                _draw_map_panel(fig, ax, _axial(shown, projection, "attribution")[0], scale, title,
                                _axial(m, projection, "image"), True, 8, width + 16)
            else:
                _draw_attr_panel(fig, ax, _axial(a, projection, "attribution")[0], _to_hwc_rgb(img2d), method,
                                 sign, title, False, width)
    except Exception as exc:  # noqa: BLE001 (one bad cell must not sink the overview)
        ax.clear()
        _draw_note_panel(ax, label or "?", f"could not draw: {type(exc).__name__}: {exc}", width)


def _row_parts(row: Sequence[Any]) -> Tuple[str, Any, list, dict]:
    if len(row) == 3:
        name, image, cells = row
        info: dict = {}
    elif len(row) == 4:
        name, image, cells, info = row
        info = dict(info or {})
    else:
        raise ValueError(f"overview row must be (name, image, cells[, info]), got {len(row)} elements")
    return str(name), image, list(cells), info


def overview_figure(
    rows: Sequence[Sequence[Any]],
    method: str = "map",
    sign: str = "all",
    projection: str = "mid",
    *,
    clip: Optional[float] = DEFAULT_CLIP,
    max_columns: int = MAX_COLUMNS,
):
    """Grid of inputs by methods, wrapped to ``max_columns`` panels a line (legible at 100 %).

    ``rows``: ``[(input_name, image (C, *spatial), cells[, info]), ...]``. ``info`` may hold
    ``mask`` (outlined on the input) and ``caption`` (e.g. the prediction). Each cell is
    ``(label, attr or None, note[, kind])`` or a mapping with keys ``label``, ``array``,
    ``note``, ``kind`` ('attribution' or 'image'), ``score``, ``target`` and ``mask``. Each
    input starts a line with its own panel; its methods follow, continuing on further lines.
    Every panel names its method, score and target; with ``method='map'`` each has its own
    colour bar in raw units with clipping stated (methods differ in units). A failed method is
    a grey panel with its note; an 'image' cell is shown as an image; for 3D inputs each panel
    is the last-axis (axial) view of :func:`views_3d`. A cell that cannot be drawn shows the
    error instead of failing the whole figure.
    """
    _check_method_sign(method, sign)
    rows = [_row_parts(r) for r in rows]
    if not rows:
        raise ValueError("overview_figure needs at least one row")
    if max_columns < 2:
        raise ValueError(f"max_columns must be at least 2, got {max_columns}")
    per_line = max_columns - 1
    lines = [max(1, -(-len(cells) // per_line)) for _, _, cells, _ in rows]
    ncols = 1 + min(per_line, max(1, max(len(cells) for _, _, cells, _ in rows)))
    per_line = ncols - 1  # fewer methods than a line holds: the grid is as wide as the most methods
    height = CELL_HEIGHT if method == "map" else CELL_WIDTH
    fig = _new_figure((CELL_WIDTH * ncols, height * sum(lines) + 0.4), "constrained" if method == "map" else None)
    axes = fig.subplots(sum(lines), ncols, squeeze=False)
    width, line, any_3d = 30, 0, False
    for (name, image, cells, info), n_lines in zip(rows, lines):
        img = None if image is None else to_display_image(image)
        any_3d = any_3d or (img is not None and img.ndim - 1 == 3)
        img2d = _axial(img, projection, "image")
        title = _wrap(name, width, 2) + (f"\n{_wrap(info['caption'], width, 2)}" if info.get("caption") else "")
        _draw_image_panel(axes[line][0], img2d, title, width)
        if img is not None and info.get("mask") is not None:
            with contextlib.suppress(ValueError):
                _outline(axes[line][0], _axial(_mask_array(info["mask"], img.shape[1:]), projection, "image"))
        for k in range(1, n_lines):
            axes[line + k][0].axis("off")
        for n, cell in enumerate(cells):
            ax = axes[line + n // per_line][1 + n % per_line]
            _draw_cell(fig, ax, cell, image, img, img2d, method, sign, projection, clip, width)
        for n in range(len(cells), n_lines * per_line):
            axes[line + n // per_line][1 + n % per_line].axis("off")
        line += n_lines
    if any_3d:
        view = "maximum-intensity projection along z" if projection == "mip" else "mid-slice z"
        fig.suptitle(f"3D inputs: {view} (last axis)", fontsize=9)
    if method != "map":
        fig.tight_layout()
    return fig
