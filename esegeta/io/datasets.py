"""A run's inputs as a stream: listed up front, loaded a few at a time, never all in memory.

A plan lists its inputs as :class:`InputRef`\\ s (name, index, where from); a job loads the few
it explains (:meth:`InputRef.load`) through a small cache of recently loaded inputs, sized in
bytes (:data:`CACHE_BYTES`), so the methods run one after the other on one input read it once;
the runner :meth:`~InputRef.release`\\ s an input when its last job has ended, and :func:`scan`
caches nothing, so what the cache holds does not grow with the number of inputs.
Two sources:

- **files** (``inputs.paths``): files, globs and folders, thousands of them; listing reads none.
- **a dataset** (``inputs.dataset``: ``file.py:callable`` or ``module:callable``, called with
  ``inputs.dataset_kwargs``): a map-style torch ``Dataset`` (``__len__``, ``__getitem__``)
  whose items are an input (tensor or array, with or without its channel axis), an
  ``(input, label, ...)`` sequence, or a mapping with ``"input"`` (or ``"image"``) and
  ``"label"``. Inputs are named ``item-00000``, ``item-00001``...; the label of each reaches
  the manifest (``inputs[].label``, ``runs[].input_label``) and the attribution store.

:func:`scan` reads every input once, one at a time, for what a plan needs of all of them (the
resume digest, the shape that groups inputs into batches, finiteness and the label).
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esegeta.errors import ConfigError
from esegeta.io import nnunet
from esegeta.io.loading import InputItem, expand_paths, input_names, load_callable, load_input, preprocess, to_tensor
from esegeta.io.resume import tensor_digest
from esegeta.io.outputs import unique_names
from esegeta.spec.sections import InputsConfig, ModelConfig, section

log = logging.getLogger("esegeta")
#: Bytes of recently loaded inputs kept for the next job on them (one input's methods run in a row).
CACHE_BYTES = 256 * 2**20


class _Cache:
    """Loaded inputs by index, least recently used dropped first past ``budget`` bytes."""

    def __init__(self, budget: int | None = None):
        self.budget = CACHE_BYTES if budget is None else budget
        self._items: OrderedDict[int, InputItem] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, index: int, load, keep: bool = True) -> InputItem:
        with self._lock:
            item = self._items.get(index)
            if item is not None:
                self._items.move_to_end(index)
                return item
        item = load(index)
        size = item.tensor.element_size() * item.tensor.nelement()
        with self._lock:
            if keep and index not in self._items and size <= self.budget:
                self._items[index] = item
                self._bytes += size
                while self._bytes > self.budget:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.tensor.element_size() * old.tensor.nelement()
        return item

    def held(self) -> list[int]:
        """The indices of the inputs in the cache now, least recently used first."""
        with self._lock:
            return list(self._items)

    def drop(self, index: int) -> None:
        with self._lock:
            old = self._items.pop(index, None)
            if old is not None:
                self._bytes -= old.tensor.element_size() * old.tensor.nelement()


class FileSource:
    """Inputs from ``inputs.paths``: names from the file names, made safe and unique."""

    def __init__(self, cfg: InputsConfig, base_dir: Path | None):
        self.cfg = cfg
        self.paths = expand_paths(cfg.paths, base_dir)
        self.names = unique_names(input_names(self.paths))
        self.cache = _Cache()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, keep: bool = True) -> InputItem:
        return self.cache.get(index, lambda k: load_input(self.paths[k], self.cfg, self.names[k]), keep)


class CaseSource:
    """Inputs of a trained nnU-Net model (``model.nnunet``): ``inputs.paths`` name its cases' channel
    files (``case_0000.nii.gz``, ``case_0001.nii.gz``...), one input per case, named by the case id and
    preprocessed as the model's plans say (:mod:`esegeta.io.nnunet`); results go back to the source grid."""

    def __init__(self, cfg: InputsConfig, base_dir: Path | None, model: ModelConfig):
        if cfg.dataset is not None:
            raise ConfigError("inputs.dataset", "an nnU-Net model's inputs are case files: give inputs.paths "
                                                "('case_0000.nii.gz', 'case_0001.nii.gz', ... or their folder)")
        for key in ("normalize", "resize", "color", "depth_axis", "channel_axis"):
            if key in cfg.model_fields_set:
                raise ConfigError(f"inputs.{key}", "an nnU-Net model reads its cases as its plans say (one file per "
                                                   "channel; normalised and resampled by the plans); remove "
                                                   f"inputs.{key}")
        self.cfg = cfg
        self.trained = nnunet.open_trained(model, base_dir)
        cases = self.trained.cases(expand_paths(cfg.paths, base_dir))
        self.files = [files for _, files in cases]
        self.paths = [files[0] for files in self.files]
        self.names = unique_names([case for case, _ in cases])
        self.cache = _Cache()

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int, keep: bool = True) -> InputItem:
        return self.cache.get(index, self._load, keep)

    def _load(self, index: int) -> InputItem:
        tensor, affine, geometry = self.trained.load_case(self.files[index], self.cfg.spatial_dims)
        return InputItem(self.names[index], self.paths[index], tensor, affine, geometry=geometry)


class DatasetSource:
    """Inputs from ``inputs.dataset``: a map-style torch ``Dataset``."""

    def __init__(self, cfg: InputsConfig, base_dir: Path | None):
        ref = cfg.dataset
        make = load_callable(ref, base_dir, "inputs.dataset")
        try:
            dataset = make(**cfg.dataset_kwargs)
        except Exception as exc:
            where = "inputs.dataset_kwargs" if cfg.dataset_kwargs else "inputs.dataset"
            raise ConfigError(where, f"calling {ref} failed: {type(exc).__name__}: {exc}") from exc
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise ConfigError("inputs.dataset", f"{ref} returned {type(dataset).__name__}, not a map-style torch "
                                                "Dataset (with __len__ and __getitem__)")
        try:
            size = len(dataset)
        except (Exception, SystemExit) as exc:  # a negative or non-integer __len__, or one that raises
            raise ConfigError("inputs.dataset", f"len() of {ref}'s dataset failed: {type(exc).__name__}: {exc}; "
                                                "__len__ must return the number of items (>= 1)") from exc
        if size == 0:
            raise ConfigError("inputs.dataset", f"{ref} returned an empty dataset")
        self.cfg, self.ref, self.dataset = cfg, ref, dataset
        width = max(5, len(str(len(dataset) - 1)))
        # made when read, not held: a run of 20,000 items held 20,000 names and paths (issue 26)
        self.names = _Numbered(len(dataset), lambda k: f"item-{k:0{width}d}")
        self.paths = _Numbered(len(dataset), lambda k: Path(f"{ref}[{k}]"))
        self.cache = _Cache()

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int, keep: bool = True) -> InputItem:
        return self.cache.get(index, self._load, keep)

    def _load(self, index: int) -> InputItem:
        where = f"{self.ref}[{index}]"
        try:
            raw = self.dataset[index]
        except (Exception, SystemExit) as exc:  # the user's __getitem__ failed: named, not a traceback
            raise ConfigError("inputs.dataset", f"reading {where} failed: {type(exc).__name__}: {exc}") from exc
        x, label = split_item(raw, where)
        try:
            array = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
        except Exception as exc:  # noqa: BLE001 (an object NumPy cannot hold)
            raise ConfigError("inputs.dataset", f"{where}'s input is a {type(x).__name__}, not an array: {exc}") from exc
        if array.dtype.kind not in "biuf":
            raise ConfigError("inputs.dataset", f"{where}'s input is a {type(x).__name__} of {array.dtype} values, "
                                                "not numbers: an item must be a tensor or array (or (input, label))")
        tensor = to_tensor(array, self.cfg.spatial_dims, False, self.paths[index], self.cfg.channel_axis)
        return InputItem(self.names[index], self.paths[index], preprocess(tensor, self.cfg),
                         channels_last=self.cfg.channel_axis == "last", label=plain_label(label))


class _Numbered(Sequence):
    """``make(k)`` for k in ``range(n)``, made when read (a dataset's item names and paths)."""

    def __init__(self, n: int, make: Callable[[int], Any]):
        self._n, self._make = n, make

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._make(k) for k in range(self._n)[index]]
        return self._make(range(self._n)[index])


def split_item(raw: Any, where: str) -> tuple[Any, Any]:
    """(input, label or None) of one dataset item."""
    if isinstance(raw, dict):
        key = next((k for k in ("input", "image", "x") if k in raw), None)
        if key is None:
            raise ConfigError("inputs.dataset", f"{where} is a mapping without an 'input' (or 'image') entry: "
                                                f"keys {sorted(map(str, raw))}")
        return raw[key], raw.get("label", raw.get("target"))
    if isinstance(raw, (tuple, list)):
        if not raw:
            raise ConfigError("inputs.dataset", f"{where} is an empty sequence")
        return raw[0], raw[1] if len(raw) > 1 else None
    return raw, None


def plain_label(label: Any) -> Any:
    """A label as JSON can hold it: a number or string (a one-element tensor/array as its value)."""
    if label is None or isinstance(label, (bool, int, float, str)):
        return label
    if torch.is_tensor(label) or isinstance(label, (np.ndarray, np.generic)):
        value = np.asarray(label.detach().cpu() if torch.is_tensor(label) else label)
        return value.item() if value.size == 1 else value.tolist()
    return str(label)


class InputRef:
    """One input of a run, not loaded: :meth:`load` reads it (cached briefly); ``shape``,
    ``digest``, ``finite`` and ``label`` are known after :func:`scan`; ``name`` and ``path`` are its
    source's. Attributes of :class:`~esegeta.io.loading.InputItem` (``tensor``, ``affine``,
    ``own_order``...) load it. Slotted: a run holds one per input for the whole run."""
    __slots__ = ("index", "source", "shape", "finite", "label", "_digests")

    def __init__(self, index: int, source: Any, shape: tuple[int, ...] | None = None, finite: bool = True,
                 label: Any = None, digests: Digests | None = None):
        self.index, self.source = index, source
        self.shape, self.finite, self.label = shape, finite, label
        self._digests = digests if digests is not None else Digests(index + 1)

    @property
    def digest(self) -> str | None:
        """The input tensor's sha256 (:func:`esegeta.io.resume.tensor_digest`), once scanned."""
        return self._digests[self.index]

    @digest.setter
    def digest(self, value: str) -> None:
        self._digests[self.index] = value

    @property
    def name(self) -> str:
        return self.source.names[self.index]

    @property
    def path(self) -> Path:
        return self.source.paths[self.index]

    def load(self, keep: bool = True) -> InputItem:
        """The input, read (and kept in the cache, unless ``keep`` is false) or from the cache."""
        return self.source.load(self.index, keep)

    def release(self) -> None:
        """Drop it from the cache (its last job has ended)."""
        self.source.cache.drop(self.index)

    @property
    def tensor(self) -> torch.Tensor:
        return self.load().tensor

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in InputRef.__slots__:  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.load(), name)

    def __repr__(self) -> str:
        return f"InputRef(name={self.name!r}, index={self.index}, shape={self.shape})"


def source(cfg: InputsConfig | dict, base_dir: Path | None,
           model: ModelConfig | None = None) -> FileSource | DatasetSource | CaseSource:
    """The source the ``inputs`` section names (a dict from Python is validated as one); with a trained
    nnU-Net ``model``, its cases."""
    cfg = section(InputsConfig, cfg, "inputs")
    if model is not None and model.nnunet is not None:
        return CaseSource(cfg, base_dir, model)
    return DatasetSource(cfg, base_dir) if cfg.dataset else FileSource(cfg, base_dir)


def refs(src: FileSource | DatasetSource) -> list[InputRef]:
    digests = Digests(len(src))
    return [InputRef(k, src, digests=digests) for k in range(len(src))]


class Digests:
    """The sha256 digests of ``n`` inputs, 32 bytes each in one array (a hex string per input, made during
    the scan between its transient objects, held ~113 bytes and a page of the heap here and there: issue 26)."""

    def __init__(self, n: int):
        self._raw = np.zeros((n, 32), np.uint8)
        self._known = np.zeros(n, bool)

    def __getitem__(self, k: int) -> str | None:
        return self._raw[k].tobytes().hex() if self._known[k] else None

    def __setitem__(self, k: int, hexdigest: str) -> None:
        self._raw[k] = np.frombuffer(bytes.fromhex(hexdigest), np.uint8)
        self._known[k] = True


def scan(inputs: list[InputRef]) -> None:
    """Read every input once, one at a time: its digest (the resume key), shape, finiteness, label.
    Nothing is cached: the jobs read the inputs in their own order, the first ones first."""
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per shape, not per input
    for ref in inputs:
        if ref.digest is not None:
            continue
        item = ref.load(keep=False)
        shape = tuple(item.tensor.shape)
        ref.shape, ref.digest = shapes.setdefault(shape, shape), tensor_digest([item.tensor])
        ref.finite, ref.label = bool(torch.isfinite(item.tensor).all()), item.label


def samples_digest(inputs: list[InputRef]) -> str:
    """A digest of the inputs shaped like the first (what methods that fit on data read)."""
    h = hashlib.sha256()
    for ref in inputs:
        if ref.shape == inputs[0].shape:
            h.update(ref.digest.encode())
    return h.hexdigest()


def samples(inputs: list[InputRef]) -> torch.Tensor:
    """The inputs shaped like the first, as one batch (for methods that fit on data: all in memory)."""
    def shape(ref) -> tuple[int, ...]:
        return getattr(ref, "shape", None) or tuple(ref.tensor.shape)

    first = shape(inputs[0])
    return torch.cat([ref.load(keep=False).tensor for ref in inputs if shape(ref) == first])  # not cached: N inputs
