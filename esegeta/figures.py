"""Figures of attributions, 2D and 3D.

matplotlib (Agg backend) and captum are imported lazily, inside the functions
that draw.  Figures are built with :class:`matplotlib.figure.Figure` directly
(not through pyplot), so nothing is ever shown and no global pyplot state
accumulates; save them with :func:`esegeta.outputs.save_figure`.

Conventions
-----------
* Arrays are channel-first: an input image is ``(C, *spatial)``, an attribution
  ``(C', *spatial')`` where ``spatial'`` is the input's spatial shape or a
  coarser (layer) one.  ``spatial`` has 2 (H, W) or 3 (X, Y, Z) axes.
* 2D panels are drawn by captum's ``visualize_image_attr`` (the reference);
  attributions are summed over channels first, which is what captum does
  itself for an (H, W, C) attribution.
* 3D volumes are shown as three orthogonal 2D views (:func:`views_3d`), each
  drawn exactly like a 2D image.
"""
from __future__ import annotations

import textwrap
import warnings
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "METHODS",
    "SIGNS",
    "to_display_image",
    "match_resolution",
    "views_3d",
    "attribution_figure",
    "overview_figure",
]

#: Visualisation methods of captum's ``visualize_image_attr`` supported here.
METHODS = ("heat_map", "blended_heat_map", "masked_image", "alpha_scaling")
#: Signs of captum's ``visualize_image_attr``.
SIGNS = ("all", "positive", "negative", "absolute_value")

_NEEDS_IMAGE = ("blended_heat_map", "masked_image", "alpha_scaling")
_UNSIGNED_ONLY = ("masked_image", "alpha_scaling")  # captum refuses sign='all'
_CELL_INCHES = 2.2


# --------------------------------------------------------------------------- #
# lazy imports
# --------------------------------------------------------------------------- #
def _new_figure(figsize: Tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _captum_visualize():
    import matplotlib

    matplotlib.use("Agg")
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


def _finite(a: np.ndarray) -> Tuple[np.ndarray, bool]:
    """float64 copy with non-finite values set to 0, and whether any were."""
    a = np.asarray(a, dtype=np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        a = np.where(bad, 0.0, a)
        return a, True
    return a, False


def to_display_image(image: Any) -> np.ndarray:
    """Input tensor ``(C, *spatial)`` of any range -> float32 ``(C', *spatial)`` in [0, 1].

    Min-max normalisation over the whole array (a constant image becomes all
    zeros; non-finite values count as 0).  One channel stays one channel,
    three channels are kept as RGB, any other channel count is averaged into
    one channel.
    """
    img, _ = _finite(_to_numpy(image))
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
    as :func:`esegeta.outputs.layer_affine`).  Returned unchanged (as float32)
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
                mag = np.nan_to_num(mag, nan=-1.0)
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
    lines = textwrap.wrap(str(text), width=width) or [""]
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
# public figures
# --------------------------------------------------------------------------- #
def _prepare_attr(attr: np.ndarray, img: Optional[np.ndarray]) -> np.ndarray:
    """Channel-summed float32 attribution (1, *spatial) at the image's resolution."""
    nd = _spatial_rank(attr, "attribution")
    a, _ = _finite(attr)
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
    method: str = "blended_heat_map",
    sign: str = "absolute_value",
    title: str = "",
    projection: str = "mid",
    kind: Optional[str] = None,
    show_colorbar: bool = True,
):
    """Figure of one attribution over its input.

    ``attr``: ``(C', *spatial)`` at the input's or at a coarser (layer)
    resolution (resampled for display with :func:`match_resolution`; summed
    over channels, as captum does).  ``image``: the input ``(C, *spatial)`` in
    any range.  2D: one panel drawn by captum's ``visualize_image_attr`` with
    ``method`` / ``sign``.  3D: three panels, the orthogonal views of
    :func:`views_3d` (``projection`` 'mid' or 'mip').

    ``kind='image'`` (the default when ``image`` is None) shows ``attr`` as an
    image in its own right (min-max normalised), e.g. a feature
    visualisation that is not aligned with any input.  ``kind='attribution'``
    without an image falls back to a plain heat map.

    Special cases never raise: ``sign='all'`` with ``masked_image`` /
    ``alpha_scaling`` (refused by captum) shows the absolute value; an
    attribution that is all zero (or has no values of the requested sign) is
    shown as a blank map with a note in the title.
    """
    _check_method_sign(method, sign)
    img = None if image is None else to_display_image(image)
    kind = kind or ("image" if image is None else "attribution")
    if kind not in ("attribution", "image"):
        raise ValueError(f"kind must be 'attribution' or 'image', got {kind!r}")
    a = _as_channel_first(attr, None if image is None else _to_numpy(image))
    if kind == "image":
        return _image_figure(to_display_image(a), title, projection)
    return _attribution_panels(_prepare_attr(a, img), img, method, sign, title, projection, show_colorbar)


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
    """An attribution over its input: one panel in 2D, three orthogonal views in 3D."""
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


def _axial(arr_chw: np.ndarray, projection: str, kind: str) -> np.ndarray:
    """2D arrays pass through; 3D ones give their last-axis (axial) view."""
    if arr_chw.ndim - 1 == 3:
        return views_3d(arr_chw, projection, kind)[2]
    return arr_chw


def _unpack_cell(cell: Sequence[Any]) -> Tuple[str, Any, str, str]:
    if len(cell) == 3:
        label, arr, note = cell
        kind = "attribution"
    elif len(cell) == 4:
        label, arr, note, kind = cell
        kind = kind or "attribution"
    else:
        raise ValueError(
            f"overview cell must be (label, array, note[, kind]), got {len(cell)} elements"
        )
    if kind not in ("attribution", "image"):
        raise ValueError(f"cell kind must be 'attribution' or 'image', got {kind!r}")
    return str(label), arr, "" if note is None else str(note), kind


def _draw_cell(fig, ax, cell: Sequence[Any], image: Any, img: Optional[np.ndarray], img2d: Optional[np.ndarray],
               method: str, sign: str, projection: str, width: int) -> None:
    """One overview cell: a note for a failed method, an image, or an attribution over the input;
    a cell that cannot be drawn shows the error instead of sinking the whole figure."""
    try:
        label, arr, note, kind = _unpack_cell(cell)
    except ValueError as exc:
        _draw_note_panel(ax, "?", f"bad cell: {exc}", width)
        return
    try:
        if arr is None:
            _draw_note_panel(ax, label, note or "no result", width)
        elif kind == "image":
            disp = to_display_image(_as_channel_first(arr, None))
            _spatial_rank(disp, "image")
            _draw_image_panel(ax, _axial(disp, projection, "image"), label, width)
        else:
            a = _prepare_attr(_as_channel_first(arr, None if image is None else _to_numpy(image)), img)
            title = f"{label}: {note}" if note else label
            _draw_attr_panel(fig, ax, _axial(a, projection, "attribution")[0], _to_hwc_rgb(img2d), method, sign,
                             title, False, width)
    except Exception as exc:  # noqa: BLE001 (one bad cell must not sink the overview)
        ax.clear()
        _draw_note_panel(ax, str(cell[0]) if len(cell) else "?", f"could not draw: {type(exc).__name__}: {exc}", width)


def overview_figure(
    rows: Sequence[Tuple[str, Any, Sequence[Sequence[Any]]]],
    method: str = "blended_heat_map",
    sign: str = "absolute_value",
    projection: str = "mid",
):
    """Grid of inputs (rows) by methods (columns).

    ``rows``: ``[(input_name, image (C, *spatial), cells), ...]`` where each
    cell is ``(label, attr or None, note)`` or ``(label, array, note, kind)``
    with ``kind`` 'attribution' (default) or 'image'.  The first column shows
    the input, then one column per cell.  A cell whose array is None (the
    method failed) is a grey panel showing ``note``; an 'image' cell shows its
    array as an image (min-max normalised, not aligned with the input).  For
    3D inputs each row shows the last-axis (axial) view of :func:`views_3d`.
    A cell that cannot be drawn (e.g. wrong shape) shows the error instead of
    failing the whole figure.
    """
    _check_method_sign(method, sign)
    rows = list(rows)
    if not rows:
        raise ValueError("overview_figure needs at least one row")
    ncols = 1 + max(len(r[2]) for r in rows)
    nrows = len(rows)
    any_3d = False
    fig = _new_figure((_CELL_INCHES * ncols, _CELL_INCHES * nrows + 0.4))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    width = 28
    for r, (name, image, cells) in enumerate(rows):
        img = None if image is None else to_display_image(image)
        if img is not None and img.ndim - 1 == 3:
            any_3d = True
        img2d = None if img is None else _axial(img, projection, "image")
        _draw_image_panel(axes[r][0], img2d, str(name), width)
        for c, cell in enumerate(cells, start=1):
            _draw_cell(fig, axes[r][c], cell, image, img, img2d, method, sign, projection, width)
        for c in range(1 + len(cells), ncols):
            axes[r][c].axis("off")
    if any_3d:
        view = "MIP along z" if projection == "mip" else "mid-slice z"
        fig.suptitle(f"3D inputs: {view} (last axis)", fontsize=9)
    fig.tight_layout()
    return fig
