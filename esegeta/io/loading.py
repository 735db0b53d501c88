"""Loading what a config names: the model (factory + weights, or TorchScript), inputs,
masks, and ``file.py:callable`` / ``module:callable`` references.

Weights are always read with ``torch.load(..., weights_only=True)``: a pickle that would
run code is refused, never executed.
"""
from __future__ import annotations

import glob
import os
import re
import hashlib
import importlib
import importlib.util
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from esegeta.errors import ConfigError
from esegeta.compat import ensure_torchvision_importable
from esegeta.errors import shown
from esegeta.errors import did_you_mean
from esegeta.io import nnunet
from esegeta.spec.sections import InputsConfig, ModelConfig, Normalize, section

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
ARRAY_SUFFIXES = (".npy", ".pt", ".pth")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
INPUT_SUFFIXES = IMAGE_SUFFIXES + ARRAY_SUFFIXES + NIFTI_SUFFIXES


def resolve(path: str | Path, base_dir: Path | None) -> Path:
    try:
        path = Path(path).expanduser()
    except RuntimeError:  # '~someone' who has no home here
        path = Path(path)
    return path if path.is_absolute() or base_dir is None else base_dir / path


def is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the system cannot even look up (too long, a NUL)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def load_callable(ref: str, base_dir: Path | None, field: str):
    """``file.py:name`` (relative to ``base_dir``) or ``package.module:name`` → the object.

    torchvision's missing operators are declared first where that is what breaks importing it
    (:mod:`esegeta.compat`), so a user's file that imports torchvision loads on CPU-only torch."""
    module_ref, sep, attr = ref.rpartition(":")
    if not sep or not module_ref or not attr:
        raise ConfigError(field, f"{shown(ref)} is not 'file.py:callable' or 'module:callable'")
    if not attr.isidentifier():
        raise ConfigError(field, f"{shown(attr)} (after the ':') is not a Python name")
    ensure_torchvision_importable()
    if module_ref.lower().endswith(".py") or "/" in module_ref or "\\" in module_ref:
        file = resolve(module_ref, base_dir)
        if not module_ref.endswith(".py"):
            raise ConfigError(field, f"{shown(module_ref)} is not a Python file name ending in '.py' (nor a module "
                                     "name like 'package.module')")
        if not is_file(file):
            raise ConfigError(field, f"file {shown(str(file), 200)} does not exist (paths are relative to the "
                                     "config's folder)")
        name = "esegeta_user_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            folder = str(file.resolve().parent)
            sys.path.insert(0, folder)  # as when running the file: its neighbours are importable
            try:
                spec.loader.exec_module(module)
            except (Exception, SystemExit) as exc:  # sys.exit() in the file: nothing can run
                del sys.modules[name]
                raise ConfigError(field, f"importing {file} failed: {type(exc).__name__}: {exc}") from exc
            finally:
                sys.path.remove(folder)
    else:
        if not _MODULE_NAME.fullmatch(module_ref):
            raise ConfigError(field, f"{shown(module_ref)} is neither a module name ('package.module') nor a file "
                                     "('file.py')")
        try:
            module = importlib.import_module(module_ref)
        except ImportError as exc:
            raise ConfigError(field, f"cannot import module {module_ref!r}: {exc}") from exc
        except (Exception, SystemExit) as exc:  # noqa: BLE001 (the module's own code failed)
            raise ConfigError(field, f"importing {module_ref!r} failed: {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(field, f"{module_ref} has no {attr!r}" + did_you_mean(attr, names))
    return getattr(module, attr)


_UNSAFE_ADVICE = re.compile(r"allow_pickle|weights_only|unsafe|trust|pickle\.load|two options", re.IGNORECASE)


def _first_line(exc: Exception) -> str:
    """The first line of an exception's message, without terminal colour codes, and without
    upstream advice to load the file unsafely (esegeta never does)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    sentences = [s for s in re.split(r"(?<=\.)\s+", line) if not _UNSAFE_ADVICE.search(s)]
    return " ".join(sentences) or "the file is not plain data (pickled objects are refused)"


def _is_torchscript(path: Path) -> bool:
    if not is_file(path):  # a device (/dev/zero) or a FIFO would be read without end
        return False
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def load_state_dict(path: Path, field: str = "model.weights") -> dict[str, torch.Tensor]:
    """A state dict from ``path``, loaded with ``weights_only=True`` (never runs pickled code)."""
    if not is_file(path):
        raise ConfigError(field, f"weights file {path} does not exist" if not path.exists() else
                          f"{path} is not a regular file (a folder, device or FIFO); give a state dict file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for pickles that would run code, RuntimeError for junk
        raise ConfigError(field, f"refused to load {path.name}: it is not a plain state dict "
                                 f"(loaded with weights_only=True): {_first_line(exc)}") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(field, f"{path.name} does not hold a state dict (a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_model(model_cfg: ModelConfig | dict, base_dir: Path | None) -> nn.Module:
    """The user's model from the ``model`` section (a dict from Python is validated as one), in eval mode."""
    model_cfg = section(ModelConfig, model_cfg, "model")
    if model_cfg.nnunet is not None:
        return nnunet.open_trained(model_cfg, base_dir).network()
    factory, weights = model_cfg.factory, model_cfg.weights
    weights_path = resolve(weights, base_dir) if weights else None
    if factory is None:
        if weights_path is None or not is_file(weights_path) or not _is_torchscript(weights_path):
            raise ConfigError("model", "give model.factory ('file.py:callable'), model.weights as a TorchScript file, "
                                       "or model.nnunet (a trained nnU-Net folder)")
        try:
            return torch.jit.load(str(weights_path), map_location="cpu").eval()
        except Exception as exc:  # noqa: BLE001 (a zip that only looks like TorchScript)
            raise ConfigError("model.weights", f"{weights_path.name} is not a TorchScript model torch can load: "
                                               f"{_first_line(exc)[:200]}") from exc
    make = load_callable(factory, base_dir, "model.factory")
    if not callable(make):
        raise ConfigError("model.factory", f"{factory} is a {type(make).__name__}, not a callable that makes the model")
    try:
        model = make(**model_cfg.kwargs)
    except (Exception, SystemExit) as exc:  # a factory calling sys.exit() ran nothing: exit 2, not 0
        field = "model.kwargs" if model_cfg.kwargs else "model.factory"
        raise ConfigError(field, f"calling {factory} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError("model.factory", f"{factory} returned {type(model).__name__}, not a torch.nn.Module")
    if weights_path is not None:
        if _is_torchscript(weights_path):
            raise ConfigError("model.weights", f"{weights_path.name} is a TorchScript model, not a state dict; "
                                               "remove model.factory to load it as the model")
        state = load_state_dict(weights_path)
        fit = weights_fit(model, state)
        if fit:
            raise ConfigError("model.weights", f"weights do not fit {factory}: {fit}")
        model.load_state_dict(state)
    return model.eval()


def weights_fit(model: nn.Module, state: dict[str, torch.Tensor], shown_keys: int = 3) -> str | None:
    """None when ``state`` loads into ``model``, else a summary: keys matched, missing, unexpected
    and of another shape, with the first few of each."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and torch.is_tensor(own[k]) and state[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        return None
    matched = len(own) - len(missing) - len(shapes)

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:shown_keys]) + (f", ... ({len(keys) - shown_keys} more)" if len(keys) > shown_keys else "")

    parts = [f"{matched} of the model's {len(own)} keys match"]
    if missing:
        parts.append(f"{len(missing)} missing ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape ({few(shapes)})")
    hint = ""
    if unexpected and missing and len(unexpected) == len(missing):
        hint = "; is it a checkpoint of another model, or were keys saved with a prefix?"
    return "; ".join(parts) + hint


@dataclass
class InputItem:
    """One input: ``tensor`` is (1, C, *spatial) float32 as fed to the model.

    ``depth_first`` (a 3D array stored depth first, fed with depth last) and ``channels_last``
    (``inputs.channel_axis: "last"``) record how the file holds its axes, so results are
    written back in the file's own axis order (:meth:`own_order`).
    """
    name: str
    path: Path
    tensor: torch.Tensor
    affine: np.ndarray | None = None
    depth_first: bool = False
    channels_last: bool = False
    label: Any = None  # the class or value a dataset gives with the input (``inputs.dataset``)
    #: Where the model's input was resampled from the file's grid (an nnU-Net case:
    #: :class:`esegeta.io.nnunet.CaseGeometry`): results are written back through it.
    geometry: Any = None

    def own_order(self, result: np.ndarray, channels: bool = True) -> np.ndarray:
        """A result ``(C, *spatial)`` in the model's axis order → the file's own axis order
        (with ``channels=False`` the channel axis stays first, as NIfTI writing expects)."""
        if self.geometry is not None:
            return self.geometry.own_order(result, channels)
        if self.depth_first and result.ndim == 4:
            result = np.moveaxis(result, -1, 1)
        if channels and self.channels_last:
            result = np.moveaxis(result, 0, -1)
        return result

    def model_order(self, saved: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`own_order` (a saved ``.npy`` back to ``(C, *spatial)``)."""
        if self.geometry is not None:
            return self.geometry.model_order(saved)
        if self.channels_last:
            saved = np.moveaxis(saved, -1, 0)
        if self.depth_first and saved.ndim == 4:
            saved = np.moveaxis(saved, 1, -1)
        return saved


#: A recursive glob (``**``) may walk at most this many entries, this deep below its fixed folder.
GLOB_MAX_ENTRIES, GLOB_MAX_DEPTH = 200_000, 16


def _bounded_walk(path: Path, where: str, pattern: str) -> None:
    """ConfigError unless the folder a ``**`` glob walks (its part before the first wildcard) holds at
    most :data:`GLOB_MAX_ENTRIES` entries within :data:`GLOB_MAX_DEPTH` levels (``"/**/"`` would walk
    the whole file system)."""
    parts = path.parts
    cut = next((n for n, part in enumerate(parts) if any(ch in part for ch in "*?[")), len(parts))
    top = Path(*parts[:cut]) if cut else Path(".")
    seen, stack = 0, [(top, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        seen += len(entries)
        if seen > GLOB_MAX_ENTRIES:
            raise ConfigError(where, f"{pattern!r} walks more than {GLOB_MAX_ENTRIES:,} entries below {top}; "
                                     "name a smaller folder or list the files")
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if depth + 1 > GLOB_MAX_DEPTH:
                    raise ConfigError(where, f"{pattern!r} goes deeper than {GLOB_MAX_DEPTH} folders below "
                                             f"{top}; name a smaller folder or list the files")
                stack.append((Path(entry.path), depth + 1))


def expand_paths(patterns: list[str], base_dir: Path | None) -> list[Path]:
    """Files named by paths, globs or folders, in order, without duplicates; a recursive glob is
    bounded (:func:`_bounded_walk`)."""
    found: list[Path] = []
    for i, pattern in enumerate(patterns):
        path = resolve(pattern, base_dir)
        if any(ch in pattern for ch in "*?["):
            if "**" in pattern:
                _bounded_walk(path, f"inputs.paths[{i}]", pattern)
            hits = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        elif is_dir(path):
            hits = sorted(p for p in path.iterdir() if p.name.lower().endswith(INPUT_SUFFIXES))
        else:
            hits = [path]
        hits = [p for p in hits if is_file(p)]
        if not hits:
            raise ConfigError(f"inputs.paths[{i}]", f"{pattern!r} matches no file (paths are relative to the "
                                                    f"config's folder: {base_dir})")
        for p in hits:
            if not p.name.lower().endswith(INPUT_SUFFIXES):
                raise ConfigError(f"inputs.paths[{i}]", f"{p.name}: unsupported file type; use one of "
                                                        f"{', '.join(INPUT_SUFFIXES)}")
            if p not in found:
                found.append(p)
    return found


def read_array(path: Path) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(array, affine or None, channels_last) for any supported file."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        image = nib.load(str(path))
        return np.asarray(image.dataobj), image.affine, True
    if name.endswith(".npy"):
        return np.load(path, allow_pickle=False), None, False
    if name.endswith((".pt", ".pth")):
        tensor = torch.load(path, map_location="cpu", weights_only=True)
        if not torch.is_tensor(tensor):
            raise ConfigError("inputs.paths", f"{path.name} does not hold a tensor")
        return tensor.numpy(), None, False
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("L", "RGB", "I;16", "I", "F"):
            image = image.convert("RGB")
        array = np.asarray(image)
    if array.dtype == np.uint8:
        array = array / 255.0
    elif array.dtype == np.uint16:
        array = array / 65535.0
    return array, None, True


def to_tensor(array: np.ndarray, spatial_dims: int, channels_last: bool, path: Path,
              channel_axis: str = "auto") -> torch.Tensor:
    """(1, C, *spatial) float32 from an array with or without a channel (and batch) axis.

    ``channel_axis`` ``"first"``/``"last"``/``"none"`` states where the file keeps its channels;
    ``"auto"`` takes ``channels_last`` (the file type's convention) for an array with one
    more axis than ``spatial_dims``."""
    array = np.asarray(array, dtype=np.float32)
    if channel_axis != "auto":
        wanted = spatial_dims + (channel_axis != "none")
        if array.ndim != wanted:
            raise ConfigError("inputs.channel_axis", f"{path.name} has shape {array.shape}: with channel_axis "
                                                     f"{channel_axis!r} a {spatial_dims}D input has {wanted} axes")
        channels_last = channel_axis == "last"
    if array.ndim == spatial_dims:
        array = array[None]
    elif array.ndim == spatial_dims + 1:
        if channels_last:
            array = np.moveaxis(array, -1, 0)
    elif array.ndim == spatial_dims + 2 and array.shape[0] == 1:
        array = array[0]
    else:
        raise ConfigError("inputs.spatial_dims", f"{path.name} has shape {array.shape}, which is not a "
                                                 f"{spatial_dims}D input (with or without a channel axis)")
    return torch.from_numpy(np.ascontiguousarray(array))[None]


def load_mask(path: str | Path, base_dir: Path | None, device: torch.device | str | None = None) -> torch.Tensor:
    """A mask file (image, npy, pt or NIfTI) as a float tensor of 0/1 (nonzero → 1), spatial axes
    only, on ``device`` (that of the data it will mask; default the CPU)."""
    file = resolve(path, base_dir)
    if not is_file(file):
        raise ConfigError("wrapper.mask", f"mask file {file} does not exist")
    array, _, _ = read_array(file)
    array = np.asarray(array)
    if file.name.lower().endswith(IMAGE_SUFFIXES) and array.ndim == 3:
        array = array.max(axis=-1)
    return torch.as_tensor((array != 0).astype(np.float32), device=device)


def preprocess(x: torch.Tensor, cfg: InputsConfig) -> torch.Tensor:
    """Channel conversion, resizing and normalisation, as the inputs config declares."""
    if cfg.color == "grayscale" and x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    elif cfg.color == "rgb" and x.shape[1] == 1:
        x = x.expand(-1, 3, *x.shape[2:]).contiguous()
    if cfg.resize:
        size = tuple(cfg.resize)
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
        x = torch.nn.functional.interpolate(x, size=size, mode=mode, align_corners=False)
    norm = cfg.normalize
    if norm == "zscore":
        x = (x - x.mean()) / x.std().clamp_min(1e-12)
    elif norm == "minmax":
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    elif isinstance(norm, Normalize):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = torch.as_tensor(norm.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.as_tensor(norm.std, dtype=x.dtype, device=x.device).view(shape)
        if mean.numel() not in (1, x.shape[1]) or std.numel() not in (1, x.shape[1]):
            raise ConfigError("inputs.normalize", f"mean/std need 1 or {x.shape[1]} values (one per channel)")
        x = (x - mean) / std
    return x


def input_stem(path: Path) -> str:
    """A file's name without its input suffix (``scan.nii.gz`` → ``scan``)."""
    stem = path.name
    for suffix in (".nii.gz",) + INPUT_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def load_input(path: Path, cfg: InputsConfig, name: str) -> InputItem:
    """One input file as the model gets it (read, axes ordered, preprocessed)."""
    try:
        array, affine, channels_last = read_array(path)
    except ConfigError:
        raise
    except Exception as exc:  # unreadable, corrupt, or a pickle that would run code
        message = _first_line(exc)
        raise ConfigError("inputs.paths", f"cannot read {path.name}: {type(exc).__name__}: {message}") from exc
    tensor = to_tensor(array, cfg.spatial_dims, channels_last, path, cfg.channel_axis)
    # NIfTI keeps its voxel order (x, y, z); arrays stored depth first are fed with depth last.
    depth_first = (cfg.depth_axis == "first" and cfg.spatial_dims == 3
                   and not path.name.lower().endswith(NIFTI_SUFFIXES))
    if depth_first:
        tensor = tensor.movedim(2, -1).contiguous()
    tensor = preprocess(tensor, cfg)
    return InputItem(name, path, tensor, affine, depth_first, cfg.channel_axis == "last")


def input_names(paths: list[Path]) -> list[str]:
    """Each file's stem, numbered ``_2``, ``_3``... where two would be equal."""
    names: set[str] = set()
    result = []
    for path in paths:
        stem = input_stem(path)
        name, n = stem, 2
        while name in names:
            name, n = f"{stem}_{n}", n + 1
        names.add(name)
        result.append(name)
    return result


def load_inputs(cfg: InputsConfig | dict, base_dir: Path | None, path: str = "inputs") -> list[InputItem]:
    """Every input file the ``inputs`` section names (a dict from Python is validated as one, its faults
    named under ``path``), preprocessed, with unique names for output files (all in memory: a run
    streams them instead, see :mod:`esegeta.io.datasets`, which also reads ``inputs.dataset``)."""
    cfg = section(InputsConfig, cfg, path)
    if cfg.paths is None:
        raise ConfigError(f"{path}.paths", "give the files to read (load_inputs reads files, not a dataset)")
    paths = expand_paths(cfg.paths, base_dir)
    return [load_input(path, cfg, name) for path, name in zip(paths, input_names(paths))]
