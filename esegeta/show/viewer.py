"""The report's interactive 3D viewer: each 3D input with every method's map as an overlay.

The viewer is NiiVue (Rorden et al., https://github.com/niivue/niivue, BSD-2-Clause), a WebGL2
NIfTI viewer: three planes, slice scrolling with the mouse wheel, a 3D render, and real-world
coordinates from the affine. Its built file ``dist/niivue.umd.js`` comes from npm's
``@niivue/niivue`` fetched by the install step (``make viewer``, part of ``make install``) into
``<venv>/share/esegeta/niivue``, or from the path in ``$ESEGETA_NIIVUE``; it is never copied into
the repository. Without it the report keeps its static figures and says how to get the viewer.

Everything is inline: the script, and each volume as a gzipped NIfTI in base64. Volumes are
quantised to ``uint8`` with the scale in the NIfTI header (``scl_slope``/``scl_inter``: NiiVue
shows values in the map's raw units, one level = ``step``) and block-averaged to at most
:data:`MAX_VOXELS` voxels (the affine scaled to match), so a report of 20 methods on a 128³
volume stays under :data:`SIZE_BOUND_MB` plus the script (the bound is stated in the report).
"""
from __future__ import annotations

import base64
import gzip
import html
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from esegeta.io.outputs import layer_affine

#: Voxels of one embedded volume at most (a 128³ volume is averaged over 2×2×2 blocks to 64³).
MAX_VOXELS = 2 ** 20
#: The embedded overlays of 20 methods on a 128³ volume stay under this (measured: 6.6 MB for
#: white noise, the worst case for gzip; 0.7 MB for a smooth map), NiiVue's 2.3 MB script aside.
SIZE_BOUND_MB = 8
#: npm package and version the install step fetches.
NPM_PACKAGE = "@niivue/niivue@0.69.0"
#: Where the install step unpacks it, below the Python environment's prefix.
INSTALLED = Path("share") / "esegeta" / "niivue" / "package"
#: Colour maps (NiiVue's names): positive values, negative values.
POSITIVE, NEGATIVE = "warm", "winter"
#: Values with |v| below this fraction of the colour range are transparent (the input shows through).
THRESHOLD = 0.05


@dataclass(frozen=True)
class Script:
    """NiiVue's built file: its text, version and licence."""
    text: str
    version: str
    licence: str
    path: Path


def script_path() -> Path:
    """Where NiiVue's built file is looked for: ``$ESEGETA_NIIVUE`` (the file or the unpacked npm
    package folder), else ``<sys.prefix>/share/esegeta/niivue/package/dist/niivue.umd.js``."""
    given = os.environ.get("ESEGETA_NIIVUE")
    if given:
        path = Path(given)
        return path / "dist" / "niivue.umd.js" if path.is_dir() else path
    return Path(sys.prefix) / INSTALLED / "dist" / "niivue.umd.js"


def missing() -> str | None:
    """Why the viewer cannot be embedded here (None when it can)."""
    path = script_path()
    if path.is_file():
        return None
    return (f"NiiVue's built file is not at {path}: run `make viewer` (npm pack {NPM_PACKAGE} into "
            f"<venv>/{INSTALLED.parent}) or set ESEGETA_NIIVUE to niivue.umd.js")


@lru_cache(maxsize=2)
def _load(path: Path, mtime: float) -> Script:
    text = path.read_text(encoding="utf-8")
    meta: dict[str, Any] = {}
    package = path.parent.parent / "package.json"
    if package.is_file():
        meta = json.loads(package.read_text(encoding="utf-8"))
    # a script element ends at the first "</script": the built file holds none today; escape any
    return Script(text.replace("</script", "<\\/script"), str(meta.get("version", "unknown")),
                  str(meta.get("license", "see the package")), path)


def script() -> Script | None:
    """NiiVue's built file (cached), or None when it is not installed (:func:`missing` says why)."""
    path = script_path()
    return _load(path, path.stat().st_mtime) if path.is_file() else None


# -- volumes --------------------------------------------------------------------------------
def _block_mean(volume: np.ndarray, affine: np.ndarray, max_voxels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``volume`` averaged over f×f×f blocks (f the smallest factor that fits ``max_voxels``),
    with the affine of the coarser grid (voxel centres aligned, as :func:`layer_affine` does)."""
    f = max(1, math.ceil((volume.size / max_voxels) ** (1 / 3)))
    if f == 1:
        return volume, affine, 1
    pad = [(0, (-s) % f) for s in volume.shape]
    padded = np.pad(volume, pad, mode="edge")
    shape = [s // f for s in padded.shape]
    coarse = padded.reshape(shape[0], f, shape[1], f, shape[2], f).mean(axis=(1, 3, 5))
    return coarse, layer_affine(affine, padded.shape, coarse.shape), f


def quantise(volume: np.ndarray, signed: bool, limit: float | None = None) -> tuple[np.ndarray, float, float]:
    """``volume`` as uint8 levels with ``value ≈ level * slope + inter``: signed maps have zero at
    level 128 exactly and ±``limit`` at 1 and 255; non-negative ones 0 at level 0. ``limit``
    (default: max |value|) clips the extremes. Returns (levels, slope, inter)."""
    finite = np.nan_to_num(volume.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(limit if limit is not None else np.abs(finite).max()) or 1.0
    if signed:
        slope = top / 127.0
        levels = np.clip(np.rint(finite / slope), -127, 127) + 128
        return levels.astype(np.uint8), slope, -128.0 * slope
    slope = top / 255.0
    return np.clip(np.rint(finite / slope), 0, 255).astype(np.uint8), slope, 0.0


def nifti_gz(levels: np.ndarray, affine: np.ndarray, slope: float, inter: float) -> bytes:
    """A gzipped NIfTI-1 of uint8 ``levels`` with the affine and the scale in its header."""
    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(levels), affine)
    image.header.set_data_dtype(np.uint8)
    image.header.set_slope_inter(slope, inter)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


@dataclass(frozen=True)
class Overlay:
    """One method's map for the viewer: label, the embedded volume and how it is coloured."""
    label: str
    data: str  # base64 of a gzipped NIfTI
    signed: bool
    cal_max: float
    step: float
    factor: int

    def entry(self) -> dict[str, Any]:
        return {"label": self.label, "b64": self.data, "signed": self.signed, "cal_max": self.cal_max,
                "cal_min": THRESHOLD * self.cal_max, "step": self.step, "factor": self.factor}


def volume_of(array: np.ndarray) -> np.ndarray:
    """A (C, X, Y, Z) map or image as one (X, Y, Z) volume: channels summed (as Captum's figures do)."""
    array = np.asarray(array, dtype=np.float32)
    return array.sum(axis=0) if array.ndim == 4 else array


def overlay(label: str, attr: np.ndarray, affine: np.ndarray | None, input_shape: Sequence[int],
            max_voxels: int = MAX_VOXELS, clip: float | None = 99.5) -> Overlay:
    """A method's map (C, X, Y, Z in the file's voxel order) ready for the viewer: a map on a
    coarser layer grid gets the layer affine; values beyond the ``clip`` percentile of |value|
    are clipped, as in the figures; signed when any value is negative."""
    volume = volume_of(attr)
    base = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if tuple(volume.shape) != tuple(input_shape):
        base = layer_affine(base, input_shape, volume.shape)
    volume, base, factor = _block_mean(volume, base, max_voxels)
    finite = np.abs(volume[np.isfinite(volume)])
    limit = float(np.percentile(finite, clip)) if finite.size and clip else float(finite.max(initial=0.0))
    limit = limit or float(finite.max(initial=0.0)) or 1.0
    signed = bool((volume < 0).any())
    levels, slope, inter = quantise(volume, signed, limit)
    data = base64.b64encode(nifti_gz(levels, base, slope, inter)).decode("ascii")
    return Overlay(label, data, signed, limit, slope, factor)


def background(image: np.ndarray, affine: np.ndarray | None, max_voxels: int = MAX_VOXELS) -> dict[str, Any]:
    """The input (C, X, Y, Z, the file's voxel order; channels averaged) as the viewer's grey volume."""
    volume = np.asarray(image, dtype=np.float32)
    volume = volume.mean(axis=0) if volume.ndim == 4 else volume
    base = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    volume, base, factor = _block_mean(volume, base, max_voxels)
    lo, hi = (float(v) for v in np.percentile(volume[np.isfinite(volume)], [1, 99.5])) if np.isfinite(volume).any() \
        else (0.0, 1.0)
    shifted = np.clip(volume - lo, 0, None)
    levels, slope, inter = quantise(shifted, False, (hi - lo) or 1.0)
    data = base64.b64encode(nifti_gz(levels, base, slope, inter + lo)).decode("ascii")
    return {"b64": data, "factor": factor, "cal_min": lo, "cal_max": hi,
            "voxel_mm": [round(float(v), 4) for v in np.linalg.norm(base[:3, :3], axis=0)]}


# -- HTML -----------------------------------------------------------------------------------
_CSS = """
.viewer{border:1px solid #ddd;border-radius:6px;padding:8px;margin:10px 0;background:#fafafa}
.viewer .nvbox{width:100%;height:520px;position:relative}.viewer canvas{width:100%;height:100%;display:block}
.viewer .controls{display:flex;flex-wrap:wrap;gap:.6em;align-items:center;margin:.4em 0;font-size:.9em}
.viewer .controls button.on{background:#4c78a8;color:#fff}
"""

_GLUE = r"""
(function(){
  const POSITIVE = '%s', NEGATIVE = '%s';
  const planes = {axial: 0, coronal: 1, sagittal: 2, 'three planes': 3, '3D': 4};
  async function start(root){
    const data = JSON.parse(root.querySelector('script[type="application/json"]').textContent);
    const canvas = root.querySelector('canvas');
    const nv = new niivue.Niivue({backColor: [0, 0, 0, 1], show3Dcrosshair: true, isColorbar: true,
                                  dragAndDropEnabled: false, loadingText: 'loading',
                                  multiplanarShowRender: 0, crosshairWidth: 0.5});  // 3D render on its button (slow in software)
    await nv.attachToCanvas(canvas);
    const bg = await niivue.NVImage.loadFromBase64({base64: data.background.b64, name: 'input.nii.gz',
      colormap: 'gray', cal_min: data.background.cal_min, cal_max: data.background.cal_max, colorbarVisible: false});
    nv.addVolume(bg);
    const cache = {};
    const note = root.querySelector('.scale');
    async function show(k){
      while (nv.volumes.length > 1) nv.removeVolume(nv.volumes[1]);
      if (k >= 0) {
        const o = data.overlays[k];
        if (!cache[k]) cache[k] = await niivue.NVImage.loadFromBase64({base64: o.b64, name: o.label + '.nii.gz',
          colormap: POSITIVE, opacity: 0.8, cal_min: o.cal_min, cal_max: o.cal_max,
          colormapNegative: o.signed ? NEGATIVE : '', cal_minNeg: -o.cal_min, cal_maxNeg: -o.cal_max});
        nv.addVolume(cache[k]);
        note.textContent = o.label + ': ' + (o.signed ? 'red-yellow positive, blue negative, ' : 'values \u2265 0, ')
          + 'colours saturate at ' + (o.signed ? '\u00b1' : '') + o.cal_max.toPrecision(3) + ' (raw units); |value| below '
          + o.cal_min.toPrecision(3) + ' transparent; one level = ' + o.step.toPrecision(3)
          + (o.factor > 1 ? '; averaged over ' + o.factor + '\u00b3 voxel blocks' : '');
      } else { note.textContent = 'input only'; }
      nv.updateGLVolume();
      root.dataset.shown = k >= 0 ? data.overlays[k].label : '';
      root.dataset.ready = '1';
    }
    root.querySelector('select.method').addEventListener('change', e => show(Number(e.target.value)));
    root.querySelectorAll('button[data-plane]').forEach(b => b.addEventListener('click', () => {
      root.querySelectorAll('button[data-plane]').forEach(o => o.classList.toggle('on', o === b));
      nv.setSliceType(planes[b.dataset.plane]);
    }));
    nv.setSliceType(3);
    await show(data.overlays.length ? 0 : -1);
  }
  document.querySelectorAll('.viewer[data-viewer]').forEach(root => start(root).catch(err => {
    root.dataset.ready = 'error'; root.querySelector('.scale').textContent = 'viewer failed: ' + err;
    console.error(err);
  }));
})();
"""


def section(n: int, name: str, image: np.ndarray, affine: np.ndarray | None,
            maps: Sequence[tuple[str, np.ndarray]], clip: float | None = 99.5) -> str:
    """The viewer for one input: ``image`` and ``maps`` are (C, X, Y, Z) in the file's voxel order."""
    spatial = tuple(image.shape[-3:])
    bg = background(image, affine)
    overlays = [overlay(label, attr, affine, spatial, clip=clip).entry() for label, attr in maps]
    payload = json.dumps({"background": bg, "overlays": overlays}).replace("</", "<\\/")
    options = "".join(f"<option value='{k}'>{html.escape(o['label'])}</option>" for k, o in enumerate(overlays))
    buttons = "".join(f"<button type='button' data-plane='{p}'{' class=on' if p == 'three planes' else ''}>{p}</button>"
                      for p in ("axial", "coronal", "sagittal", "three planes", "3D"))
    size = sum(len(o["b64"]) for o in overlays) + len(bg["b64"])
    voxel = " &times; ".join(f"{v:g}" for v in bg["voxel_mm"])
    return (f"<div class='viewer' data-viewer='{n}' data-panel='viewer3d'>"
            f"<div class='controls'><label>map <select class='method'>{options}"
            f"<option value='-1'>none (input only)</option></select></label>{buttons}"
            f"<span class='note'>wheel: scroll slices; click: move the cross; voxel {voxel} mm "
            f"(from the input's affine); embedded volumes {size / 1e6:.1f} MB</span></div>"
            f"<div class='nvbox'><canvas></canvas></div><p class='note scale'></p>"
            f"<script type='application/json'>{payload}</script></div>")


def head(found: Script) -> str:
    """The viewers' style, once per report (before the viewers)."""
    return f"<style>{_CSS}</style>"


def tail(found: Script) -> str:
    """NiiVue's script and the one that starts every viewer, after the page's content (the 2.3 MB
    script is parsed once the figures and tables are drawn: the first paint does not wait)."""
    return f"<script>{found.text}</script><script>{_GLUE % (POSITIVE, NEGATIVE)}</script>"


def about(found: Script | None) -> str:
    """One line for the report: which viewer, its version and licence, or why there is none."""
    if found is None:
        return f"<p class='note'>No 3D viewer: {html.escape(missing() or '')}.</p>"
    return (f"<p class='note'>3D viewer: NiiVue {html.escape(found.version)} ({html.escape(found.licence)}, "
            f"npm {html.escape(NPM_PACKAGE.rsplit('@', 1)[0])}), inline. Overlays are uint8 with the scale in "
            f"each NIfTI header, at most {MAX_VOXELS:,} voxels each (larger volumes block-averaged): "
            f"under {SIZE_BOUND_MB} MB for 20 methods on a 128&sup3; volume, plus the viewer's script "
            f"({len(found.text) / 1e6:.1f} MB).</p>")


def versions(found: Script | None) -> Mapping[str, str]:
    """The viewer's row for the report's versions table."""
    return {"niivue (3D viewer)": f"{found.version} ({found.licence})" if found else "not installed"}
