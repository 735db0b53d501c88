"""Writing result files atomically.

Every writer here writes to a temporary file in the destination folder and
then renames it onto the final name with :func:`os.replace`, so a crash (or an
exception in the middle of writing) never leaves a half-written file under the
final name.  Parent folders are created as needed.

The temporary file is named ``.tmp-<pid>-<token>-<random>-<final name>``: it is
hidden, unique per process and thread, it names the run that writes it (``token``:
:class:`esegeta.run.writer.Writer` passes its run's, so ``--resume`` removes only the
temporary files of runs no longer alive), and it keeps the final name's extension, so
libraries that choose a format from the extension (nibabel's ``.nii.gz``,
matplotlib's ``.png``) write the right format.

Only numpy and json are imported at module level; nibabel is imported lazily.
"""
from __future__ import annotations

import contextlib
from collections import abc
import json
import math
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "save_npy",
    "save_json",
    "json_line",
    "save_nifti",
    "layer_affine",
    "save_figure",
    "save_extras",
]

_TMP_PREFIX = ".tmp-"
#: The token of temporary files written outside a run (``explain`` users, tests).
PROCESS_TOKEN = uuid.uuid4().hex[:8]


def _tmp_path_for(path: Path, token: str | None = None) -> Path:
    return path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{token or PROCESS_TOKEN}-{uuid.uuid4().hex[:8]}-{path.name}")


def _fsync_file(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    except OSError:  # pragma: no cover - best effort only
        pass


@contextlib.contextmanager
def atomic_path(path: PathLike, token: str | None = None) -> Iterator[Path]:
    """Yield a temporary path to write to; rename it onto ``path`` on success.

    The temporary path is in the same folder as ``path`` (so the rename is
    atomic) and ends with ``path``'s name (so its extension is kept).  If the
    ``with`` block raises, the temporary file is deleted (if it was created)
    and the exception propagates; ``path`` is left untouched.  If the block
    exits normally without having created the temporary file, a
    ``FileNotFoundError`` is raised.
    """
    final = Path(path)
    if not final.name:
        raise ValueError(f"not a file path: {path!r}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path_for(final, token)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(
                f"atomic_path: nothing was written to the temporary file for {final}"
            )
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: PathLike, data: bytes, token: str | None = None) -> Path:
    """Write ``data`` to ``path`` atomically; return the final path."""
    final = Path(path)
    with atomic_path(final, token) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return final


def _to_numpy(array: Any) -> np.ndarray:
    """numpy array from a numpy array, torch tensor (any device) or array-like."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # torch.Tensor
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def save_npy(path: PathLike, array: Any, token: str | None = None) -> Path:
    """Save ``array`` as float32 ``.npy`` (shape as given), atomically."""
    arr = _to_numpy(array).astype(np.float32, copy=False)
    final = Path(path)
    with atomic_path(final, token) as tmp:
        # Write through a file handle so numpy does not append ".npy".
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    return final


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):  # numpy scalars (incl. np.bool_)
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        try:
            return sorted(obj)
        except TypeError:
            return list(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch.Tensor
        return obj.detach().cpu().tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _json_key(key: Any) -> Any:
    if isinstance(key, (str, int, float, bool)) or key is None:
        return key
    if isinstance(key, np.generic):
        return key.item()
    if isinstance(key, os.PathLike):
        return os.fspath(key)
    return str(key)


def _jsonable(obj: Any) -> Any:
    """Recursively convert containers (dict keys included) for ``json.dumps``; a non-finite
    number becomes null (strict JSON has no ``NaN`` or ``Infinity``)."""
    if isinstance(obj, dict):
        return {_json_key(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, abc.Sequence)) and not isinstance(obj, (str, bytes)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)) or (hasattr(obj, "detach") and hasattr(obj, "tolist")):
        return _jsonable(_json_default(obj))
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_line(obj: Any) -> str:
    """``obj`` as one line of strict JSON (as :func:`save_json` converts it)."""
    return json.dumps(_jsonable(obj), default=_json_default, allow_nan=False)


def save_json(path: PathLike, obj: Any, token: str | None = None) -> Path:
    """Save ``obj`` as indented JSON, atomically.

    numpy scalars and arrays, paths, tuples, sets and torch tensors are
    converted; dict keys that are not JSON keys are converted too. The file is strict JSON:
    NaN and infinities are written as null (``JSON.parse`` rejects the ``NaN`` literal).
    Written as it is encoded: a manifest of 20,000 runs is not held a second and third time as
    one string and its bytes.
    """
    final = Path(path)
    with atomic_path(final, token) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            _write_json(f, obj, 0)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    return final


#: Levels of a JSON document :func:`_write_json` writes item by item (a manifest's runs are level 2).
STREAMED_LEVELS = 2


def _write_json(f: Any, obj: Any, level: int) -> None:
    """``obj`` as ``json.dump(..., indent=2)`` writes it, its first :data:`STREAMED_LEVELS` levels of
    dicts and sequences one item at a time (each converted and encoded alone; a sequence may read its
    items from disk as it goes: a run's :class:`esegeta.run.records.Records`)."""
    pad = "  " * level
    sequence = isinstance(obj, (list, tuple, abc.Sequence)) and not isinstance(obj, (str, bytes))
    if level < STREAMED_LEVELS and (isinstance(obj, dict) or sequence) and len(obj):
        pairs = obj.items() if isinstance(obj, dict) else ((None, v) for v in obj)
        f.write("{" if isinstance(obj, dict) else "[")
        for n, (key, value) in enumerate(pairs):
            f.write(("," if n else "") + "\n" + pad + "  ")
            if isinstance(obj, dict):
                text = json.dumps({_json_key(key): 0})
                f.write(text[1:text.rindex(":")] + ": ")
            _write_json(f, value, level + 1)
        f.write("\n" + pad + ("}" if isinstance(obj, dict) else "]"))
        return
    text = json.dumps(_jsonable(obj), indent=2, default=_json_default, allow_nan=False)
    f.write(text.replace("\n", "\n" + pad))


def save_nifti(path: PathLike, array: Any, affine: Optional[Any] = None, token: str | None = None) -> Path:
    """Save a channel-first attribution as NIfTI (``.nii`` or ``.nii.gz``), atomically.

    ``array`` has shape (C, X, Y, Z): written as (X, Y, Z) when C == 1, else as
    (X, Y, Z, C).  Data are stored as float32; ``affine`` is the 4x4 voxel-to-world
    matrix (identity if None).  Arrays with fewer than 3 spatial axes are
    accepted too (spatial axes are padded to 3 when C > 1).
    """
    import nibabel as nib

    arr = _to_numpy(array).astype(np.float32, copy=False)
    if arr.ndim < 2:
        raise ValueError(f"save_nifti expects (C, *spatial), got shape {arr.shape}")
    channels, spatial = arr.shape[0], arr.shape[1:]
    if len(spatial) > 3:
        raise ValueError(f"save_nifti supports at most 3 spatial axes, got shape {arr.shape}")
    if channels == 1:
        data = arr[0]
    else:
        data = np.moveaxis(arr, 0, -1)
        if len(spatial) < 3:
            data = data.reshape(tuple(spatial) + (1,) * (3 - len(spatial)) + (channels,))
    data = np.ascontiguousarray(data)
    aff = np.eye(4) if affine is None else np.asarray(_to_numpy(affine), dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {aff.shape}")
    img = nib.Nifti1Image(data, aff)
    img.header.set_data_dtype(np.float32)
    final = Path(path)
    with atomic_path(final, token) as tmp:  # tmp name ends with final.name: format kept
        nib.save(img, str(tmp))
    return final


def layer_affine(
    affine: Optional[Any], input_shape: Sequence[int], attr_shape: Sequence[int]
) -> np.ndarray:
    """Affine for an attribution on a coarser (layer) grid covering the input.

    ``input_shape`` and ``attr_shape`` are spatial shapes (if they are longer
    than 3, e.g. with a channel axis first, the last 3 entries are used; shorter
    ones scale only the first axes).  Each voxel axis is scaled by
    ``s = input / attr``, and the origin moves to the centre of the first
    coarse voxel, i.e. by ``(s - 1) / 2`` input voxels (half the new voxel minus
    half the old one), so the voxel centres of the two grids line up (the
    "align_corners=False" convention) and the map overlays the input in a viewer.
    """
    aff = np.eye(4) if affine is None else np.asarray(_to_numpy(affine), dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {aff.shape}")
    in_shape = [int(v) for v in input_shape][-3:]
    at_shape = [int(v) for v in attr_shape][-3:]
    if len(in_shape) != len(at_shape):
        raise ValueError(f"shapes differ in rank: {tuple(input_shape)} vs {tuple(attr_shape)}")
    if any(v <= 0 for v in in_shape + at_shape):
        raise ValueError("shapes must be positive")
    n = len(in_shape)
    scale = np.ones(3)
    scale[:n] = np.asarray(in_shape, dtype=np.float64) / np.asarray(at_shape, dtype=np.float64)
    out = aff.copy()
    out[:3, :3] = aff[:3, :3] * scale[None, :]
    out[:3, 3] = aff[:3, :3] @ ((scale - 1.0) / 2.0) + aff[:3, 3]
    return out


def save_figure(fig: Any, path: PathLike, dpi: int = 100, token: str | None = None) -> Path:
    """Save a matplotlib figure as PNG atomically, then close it: a figure pyplot manages (a user's)
    is closed there, if pyplot is already imported (never imported here: no backend is chosen);
    esegeta's own figures are plain ``Figure`` objects, freed when dropped."""
    final = Path(path)
    try:
        with atomic_path(final, token) as tmp:
            with open(tmp, "wb") as f:
                fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            with contextlib.suppress(Exception):
                plt.close(fig)
    return final


def save_extras(out_dir: Path, item: Any, label: str, extras: dict, token: str | None = None) -> dict:
    """Write a method's extra outputs (``Call.extras``) next to its result; returns name → path.

    A tensor or array becomes ``<label>.<name>.npy`` (batch axis dropped, as for results);
    a mapping of them (e.g. layer name → relevance) becomes ``<label>.<name>.npz``.
    """
    files: dict[str, str] = {}
    rel = Path(item.name)
    for name, value in extras.items():
        if isinstance(value, dict):
            arrays = {str(k): _to_numpy(v)[0] for k, v in value.items()}
            path = rel / f"{label}.{name}.npz"
            with atomic_path(out_dir / path, token) as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, **arrays)
        else:
            path = rel / f"{label}.{name}.npy"
            save_npy(out_dir / path, _to_numpy(value)[0], token)
        files[name] = str(path)
    return files


#: Names of the run's own files and folders in ``output.dir``: never an input's output name.
#: The folder lock and the journal of results (see :mod:`esegeta.run.writer`).
LOCK = ".esegeta.lock"
JOURNAL = ".esegeta-journal.jsonl"
#: The region and channel totals of ``output.summaries`` (see :mod:`esegeta.attribution.summaries`).
SUMMARIES_CSV = "summaries.csv"
RESERVED = frozenset({"manifest.json", "overview.png", "report.html", "esegeta.log", "attributions", LOCK, JOURNAL,
                      SUMMARIES_CSV,
                      # the evaluation's files (esegeta.evaluation.ranking, .roar) and explorer.html
                      "evaluation.csv", "evaluation_ranking.csv", "evaluation_agreement.csv", "evaluation_roar.csv",
                      "evaluation_curves.npz", "explorer.html"})


def safe_name(name: str) -> str:
    """``name`` as a file or folder name of the output: ``[A-Za-z0-9._+-]`` only, no leading
    dot (``..``, hidden files), never empty nor one of :data:`RESERVED`."""
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".") or "input"
    return safe + "_" if safe in RESERVED else safe


def unique_names(names: list[str]) -> list[str]:
    """:func:`safe_name` of each name, numbered ``_2``, ``_3``... where two would be equal."""
    taken: set[str] = set()
    result = []
    for name in names:
        stem = candidate = safe_name(name)
        n = 2
        while candidate in taken:
            candidate, n = f"{stem}_{n}", n + 1
        taken.add(candidate)
        result.append(candidate)
    return result
