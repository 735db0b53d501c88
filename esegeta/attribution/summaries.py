"""Relevance totals per region of a label map and per input channel: where a map's relevance lies.

A clinician asks "how much of the relevance lies in the tumour core, how much in the oedema?" (an
atlas or the model's own segmentation as the label map) and "which MR sequence mattered?" (the
input channels). :func:`totals` answers both from a result already in memory, no model pass:

- **regions** (``kind`` ``region``, ``key`` the label id): the voxel's relevance is the map summed
  over its channels; per label id its ``voxels``, ``sum``, ``mean`` (sum ÷ voxels) and ``positive``
  (the sum of its voxels' positive relevance);
- **channels** (``kind`` ``channel``, ``key`` the channel index), for maps with the input's channels:
  the channel's ``sum``, ``mean`` over the spatial voxels and ``positive``.

Two shares, both named as what they divide: ``share_positive`` = the row's positive relevance ÷ the
map's positive relevance (where the evidence *for* the target lies), ``share_abs`` = the row's
|relevance| ÷ the map's |relevance| (where relevance of either sign lies). Each sums to 1 over the
rows of a kind (over every label id of the map: label 0, the background, included); it is None
for a map with no positive (or no non-zero) relevance. Sums are accumulated in float64.

The label map has the input's spatial shape as the model sees it (no resampling: a map of another
shape is refused, naming the field). ``"prediction"`` labels each voxel with the model's predicted
class on the unperturbed input (:func:`predicted_labels`).
"""
from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esegeta.attribution.patcher import Grid, Stitched
from esegeta.attribution.wrappers import ACTIVATIONS, otsu, select_output
from esegeta.errors import ConfigError, Problem
from esegeta.io.loading import IMAGE_SUFFIXES, NIFTI_SUFFIXES, is_file, read_array, resolve
from esegeta.spec.config import SummariesConfig
from esegeta.spec.request import Request
from esegeta.spec.sections import InputsConfig

REGION, CHANNEL = "region", "channel"
#: The columns of a row, in the order ``summaries.csv`` writes them (after method, label and input).
COLUMNS = ("kind", "key", "name", "voxels", "sum", "mean", "positive", "share_positive", "share_abs")
#: Label ids a label map may hold (a map with more distinct values is not a label map).
MAX_LABELS = 10_000


def totals(attribution: np.ndarray, labels: np.ndarray | None = None, *, names: Mapping[int, str] | None = None,
           channel_names: Sequence[str] | None = None, input_shape: Sequence[int] | None = None
           ) -> tuple[list[dict], list[str]]:
    """Rows per region of ``labels`` and per channel of ``attribution`` ``(C, *spatial)``; and notes on
    what was left out and why (a map at another resolution than the labels; a map that is not shaped as
    the input, ``input_shape`` ``(C, *spatial)``, has no channel totals: its channels are not the input's)."""
    a = np.asarray(attribution)
    rows: list[dict] = []
    notes: list[str] = []
    if labels is not None:
        if tuple(a.shape[1:]) != tuple(labels.shape):
            notes.append(f"no region totals: the map's spatial shape {list(a.shape[1:])} is not the label map's "
                         f"{list(labels.shape)} (e.g. a layer-resolution map)")
        else:
            rows += _regions(a.sum(axis=0, dtype=np.float64), labels, names or {})
    if input_shape is not None and tuple(a.shape) != tuple(input_shape):
        notes.append(f"no channel totals: the map's shape {list(a.shape)} is not the input's {list(input_shape)}")
    else:
        rows += _channels(a, channel_names)
    return rows, notes


def _shares(positive: np.ndarray, absolute: np.ndarray) -> tuple[list, list]:
    """Each row's share of the positive and of the absolute relevance (None: the map has none)."""
    pos_total, abs_total = float(positive.sum()), float(absolute.sum())
    return ([float(p / pos_total) if pos_total > 0 else None for p in positive],
            [float(v / abs_total) if abs_total > 0 else None for v in absolute])


def _regions(relevance: np.ndarray, labels: np.ndarray, names: Mapping[int, str]) -> list[dict]:
    ids, index = np.unique(labels.ravel(), return_inverse=True)
    flat = relevance.ravel()
    voxels = np.bincount(index, minlength=len(ids))
    sums = np.bincount(index, weights=flat, minlength=len(ids))
    positive = np.bincount(index, weights=np.maximum(flat, 0.0), minlength=len(ids))
    absolute = np.bincount(index, weights=np.abs(flat), minlength=len(ids))
    share_pos, share_abs = _shares(positive, absolute)
    return [{"kind": REGION, "key": int(k), "name": names.get(int(k), str(int(k))), "voxels": int(n),
             "sum": float(s), "mean": float(s / n), "positive": float(p), "share_positive": sp, "share_abs": sa}
            for k, n, s, p, sp, sa in zip(ids, voxels, sums, positive, share_pos, share_abs)]


def _channels(a: np.ndarray, channel_names: Sequence[str] | None) -> list[dict]:
    flat = a.reshape(a.shape[0], -1)
    sums = flat.sum(axis=1, dtype=np.float64)
    positive = np.maximum(flat, 0).sum(axis=1, dtype=np.float64)
    absolute = np.abs(flat).sum(axis=1, dtype=np.float64)
    share_pos, share_abs = _shares(positive, absolute)
    named = list(channel_names) if channel_names and len(channel_names) == a.shape[0] else None
    return [{"kind": CHANNEL, "key": c, "name": named[c] if named else f"channel {c}", "voxels": int(flat.shape[1]),
             "sum": float(sums[c]), "mean": float(sums[c] / flat.shape[1]), "positive": float(positive[c]),
             "share_positive": share_pos[c], "share_abs": share_abs[c]} for c in range(a.shape[0])]


def as_labels(array: Any, where: str) -> np.ndarray:
    """``array`` as an integer label map; a ConfigError naming ``where`` for fractional values or
    more than :data:`MAX_LABELS` distinct ones."""
    values = np.asarray(array.detach().cpu() if torch.is_tensor(array) else array)
    if values.dtype == bool:
        return values.astype(np.int64)
    if not np.issubdtype(values.dtype, np.integer):
        if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
            raise ConfigError(where, "the label map holds non-integer values; give integer label ids (0 = background)")
        values = values.astype(np.int64)
    if len(np.unique(values)) > MAX_LABELS:
        raise ConfigError(where, f"the label map holds more than {MAX_LABELS} distinct values: is it an image rather "
                                 "than a label map?")
    return values


def load_labels(path: str | Path, base_dir: Path | None, spatial_dims: int, depth_first: bool = False,
                where: str = "output.summaries.labels") -> np.ndarray:
    """A label-map file (NIfTI, image, ``.npy``, ``.pt``) as integer ids in the model's axis order: spatial
    axes only; a ``.npy``/``.pt`` volume stored depth first (``inputs.depth_axis: "first"``) is turned
    depth last, as the inputs are; an RGB image keeps its first channel."""
    file = resolve(path, base_dir)
    if not is_file(file):
        raise ConfigError(where, f"label map {file} does not exist (paths are relative to the config's folder)")
    image = file.name.lower().endswith(IMAGE_SUFFIXES)
    try:
        if image:  # the stored ids, not the [0, 1] intensities inputs load as
            from PIL import Image

            with Image.open(file) as opened:
                array = np.asarray(opened)
        else:
            array = np.asarray(read_array(file)[0])
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 (an unreadable file is the user's to fix: say which)
        raise ConfigError(where, f"cannot read {file.name}: {type(exc).__name__}: {exc}") from None
    if image and array.ndim == 3:
        array = array[..., 0]
    while array.ndim > spatial_dims and 1 in (array.shape[0], array.shape[-1]):  # (1, H, W), (x, y, z, 1)
        array = array[0] if array.shape[0] == 1 else array[..., 0]
    if array.ndim != spatial_dims:
        raise ConfigError(where, f"{file.name} has shape {list(array.shape)}: a label map of {spatial_dims}D inputs "
                                 f"has {spatial_dims} axes")
    labels = as_labels(array, where)
    if depth_first and spatial_dims == 3 and not file.name.lower().endswith(NIFTI_SUFFIXES):
        labels = np.moveaxis(labels, 0, -1)
    return labels


def load_names(value: Mapping[str, str] | str | None, base_dir: Path | None,
               where: str = "output.summaries.names") -> dict[int, str]:
    """Label id → name from a mapping (JSON keys are strings) or a JSON file holding one."""
    if value is None:
        return {}
    if isinstance(value, (str, Path)):
        file = resolve(value, base_dir)
        if not is_file(file):
            raise ConfigError(where, f"names file {file} does not exist")
        try:
            value = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(where, f"{file.name} is not a JSON object of label id → name: {exc}") from None
        if not isinstance(value, dict):
            raise ConfigError(where, f"{file.name} holds a JSON {type(value).__name__}; give an object such as "
                                     '{"1": "tumour core"}')
    names = {}
    for key, name in value.items():
        try:
            names[int(key)] = str(name)
        except ValueError:
            raise ConfigError(f"{where}.{key}", f"{key!r} is not a label id; keys are integers such as \"1\"") from None
    return names


def predicted_labels(model: torch.nn.Module, x: torch.Tensor, request: Request | None = None) -> np.ndarray:
    """The model's predicted label map of ``x`` (batch of one), as the wrappers freeze masks: the argmax
    over the output's classes; a one-channel output is the threshold wrapper's mask when ``request``
    has one (its activation and number threshold), else ``sigmoid(out) > 0.5``. With a patch setting the
    output is assembled patch by patch (sliding-window inference), so memory stays that of a patch."""
    wrapper = request.wrapper if request is not None else None
    key = wrapper.output if wrapper is not None else None
    patch = request.patch if request is not None else None
    with torch.no_grad():
        if patch is not None:
            grid = Grid.over(tuple(x.shape[2:]), list(patch.size), patch.overlap, patch.blend)
            out = Stitched(model, grid, x.ndim - 2, patch.batch_size, key).assemble(x)
        else:
            out = select_output(model(x), key)
        if out.shape[1] > 1:
            return out[0].argmax(dim=0).cpu().numpy()
        if wrapper is not None and wrapper.name == "threshold":
            a = ACTIVATIONS[wrapper.activation]()(out[0, 0].float())
            t = otsu(a) if wrapper.threshold == "otsu" else float(wrapper.threshold)
            return (a > t).cpu().numpy().astype(np.int64)
        return (out[0, 0] > 0).cpu().numpy().astype(np.int64)  # sigmoid(out) > 0.5


PREDICTION = "prediction"
#: Predicted label maps a run keeps (the jobs run input by input: every method of an input shares one).
RECENT = 2


def _settings(request: Request | None) -> str:
    """What a predicted label map depends on besides the model and the input: the wrapper and the patches."""
    if request is None:
        return ""
    return repr((request.wrapper.model_dump() if request.wrapper else None,
                 request.patch.model_dump() if request.patch else None))


@dataclass(frozen=True)
class Setting:
    """A run's ``output.summaries``, loaded once: the label map (``atlas``; None with ``prediction`` or
    with channel totals only), label names, channel names, and the label map as the config names it."""
    atlas: np.ndarray | None
    prediction: bool
    names: dict[int, str]
    channels: tuple[str, ...] | None
    source: str | None
    _recent: dict = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def labels(self, model: torch.nn.Module, x: torch.Tensor, request: Request | None,
               name: str | None = None) -> np.ndarray | None:
        """The label map of the single input ``x``: the atlas, or the model's prediction (one forward
        pass; the run's methods on one input, ``name``, share it: the last :data:`RECENT` are kept)."""
        if not self.prediction:
            return self.atlas
        key = (name, _settings(request)) if name is not None else None
        with self._lock:
            if key in self._recent:
                return self._recent[key]
        labels = predicted_labels(model, x, request)
        if key is not None:
            with self._lock:
                self._recent[key] = labels
                while len(self._recent) > RECENT:
                    self._recent.pop(next(iter(self._recent)))
        return labels

    def record(self, attribution: np.ndarray, labels: np.ndarray | None, input_shape: Sequence[int]) -> dict:
        """The manifest record's ``summaries``: the label map's name, the rows, and notes on what was left out."""
        rows, notes = totals(attribution, labels, names=self.names, channel_names=self.channels,
                             input_shape=input_shape)
        return {"labels": self.source, "rows": rows, "notes": notes}


def setting(cfg: SummariesConfig | None, inputs: InputsConfig, base_dir: Path | None) -> Setting | None:
    """``output.summaries`` loaded (the atlas read once), or None; a ConfigError naming the field."""
    if cfg is None:
        return None
    prediction = cfg.labels == PREDICTION
    atlas = None
    if cfg.labels is not None and not prediction:
        atlas = load_labels(cfg.labels, base_dir, inputs.spatial_dims, inputs.depth_axis == "first")
    return Setting(atlas, prediction, load_names(cfg.names, base_dir), tuple(cfg.channels) if cfg.channels else None,
                   cfg.labels)


def shape_problems(found: Setting | None, shapes: Mapping[str, Sequence[int]]) -> list[Problem]:
    """Inputs (name → shape ``(1, C, *spatial)``) the atlas or the channel names do not fit."""
    if found is None:
        return []
    problems = []
    for name, shape in shapes.items():
        spatial, channels = tuple(shape[2:]), shape[1]
        if found.atlas is not None and tuple(found.atlas.shape) != spatial:
            problems.append(Problem("output.summaries.labels", f"the label map's shape {list(found.atlas.shape)} is not "
                                    f"the spatial shape {list(spatial)} of input {name} as the model sees it; give a "
                                    "label map of that shape (esegeta does not resample label maps)"))
        if found.channels is not None and len(found.channels) != channels:
            problems.append(Problem("output.summaries.channels", f"{len(found.channels)} names for the {channels} "
                                    f"channel(s) of input {name}; give one name per channel"))
        if problems:
            break  # one input says it; a dataset may have thousands
    return problems


def summaries(attribution: Any, labels: Any = None, *, names: Mapping[Any, str] | str | None = None,
              channel_names: Sequence[str] | None = None) -> list[dict]:
    """``esegeta.summaries``: relevance per region of ``labels`` and per channel of ``attribution``.

    ``attribution`` as :func:`esegeta.explain` returns it, ``(batch, C, *spatial)`` (a tensor or an
    array); ``labels`` an integer label map of the spatial shape (array, tensor, or a file name: NIfTI,
    image, ``.npy``), or None for the channel totals alone; ``names`` label id → name (or a JSON file);
    ``channel_names`` one name per channel (e.g. ``["T1", "T1ce", "T2", "FLAIR"]``). One dict per row
    (:data:`COLUMNS`; ``index``: the input's place in the batch): ``pandas.DataFrame(rows)`` makes a table.
    """
    a = attribution.detach().float().cpu().numpy() if torch.is_tensor(attribution) else np.asarray(attribution)
    if a.ndim < 3:
        raise ConfigError("attribution", f"shape {list(a.shape)}: give it as explain returns it, (batch, channels, "
                                         "*spatial)")
    if isinstance(labels, (str, Path)):
        labels = load_labels(labels, None, a.ndim - 2, where="labels")
    elif labels is not None:
        labels = as_labels(labels, "labels")
        while labels.ndim > a.ndim - 2 and labels.shape[0] == 1:
            labels = labels[0]
        if tuple(labels.shape) != tuple(a.shape[2:]):
            raise ConfigError("labels", f"shape {list(labels.shape)} is not the attribution's spatial shape "
                                        f"{list(a.shape[2:])}; give a label map of that shape (no resampling)")
    named = load_names(names, None, "names")
    rows = []
    for index in range(a.shape[0]):
        found, _ = totals(a[index], labels, names=named, channel_names=channel_names)
        rows += [{"index": index, **row} for row in found]
    return rows
