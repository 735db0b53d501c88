"""Attribution datasets: per method, one chunked store of every result of a run, with an index.

``<output.dir>/attributions/<label>.zarr`` is a Zarr (v3) group:

- ``attributions``: ``(N, *result_shape)`` float32, row ``k`` the result on input ``k`` as the
  model saw it (``(C, *spatial)``), chunked along the inputs (about :data:`CHUNK_BYTES` a chunk);
- ``written``: ``(N,)`` bool, True where row ``k`` holds an ``ok`` result of this run;
- ``score`` ``(N,)`` float64 (NaN where none) and ``target`` ``(N,)`` int64 (-1 where none): the
  explained value and class (wrapped column) of each input;
- attributes ``inputs`` (names, as in the manifest), ``paths`` (their files, or
  ``dataset.py:factory[k]``), ``labels`` (the dataset's labels or None), ``method``, ``label``
  and ``kind``.

Why Zarr: a chunk is a file of its own, so the writer (the output folder's one owner) writes
whole chunks as results come in and a run killed mid-way loses at most the chunk it was
writing (HDF5 keeps one file whose metadata a kill can leave unreadable); readers get lazy,
sliceable arrays (``store.attributions[100:200]`` reads two chunks), also from dask or xarray;
and every chunk's file can be read by anyone with a Zarr library, with no index code of
esegeta's (sharded ``.npy`` would need one). Rows arrive out of order (threads, Ray actors), so
:class:`StoreWriter` buffers them per chunk and writes a chunk once all its rows are in, or when
the buffer passes :data:`BUFFER_BYTES`, and at the end of the run.

``open_store(run_dir, method)`` reads one: see :class:`AttributionStore`.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esegeta.errors import ConfigError

log = logging.getLogger("esegeta")
FOLDER = "attributions"
#: Bytes of results in one chunk (rows of one store), at least one row.
CHUNK_BYTES = 4 * 2**20
#: Bytes of rows buffered before the fullest partial chunk is written with the rows it has.
BUFFER_BYTES = 64 * 2**20


def check(formats: list[str]) -> None:
    """A ConfigError naming ``output.formats`` if ``"zarr"`` is asked for and zarr (3 or newer) is missing."""
    if "zarr" not in formats:
        return
    try:
        import zarr
    except ImportError:
        zarr = None
    if zarr is None or int(zarr.__version__.split(".")[0]) < 3:
        raise ConfigError("output.formats", "'zarr' needs zarr 3 or newer (Python 3.11+): pip install 'esegeta[store]' "
                                            "(or leave 'zarr' out of output.formats)")


def store_path(out: Path, label: str) -> Path:
    return Path(out) / FOLDER / f"{label}.zarr"


class _MethodStore:
    """The store of one method label while a run writes it."""

    def __init__(self, path: Path, names: list[str], labels: list[Any], meta: dict, shape: tuple[int, ...],
                 resume: bool):
        import zarr

        self.path, self.n = path, len(names)
        row_bytes = 4 * int(np.prod(shape))
        self.rows = max(1, min(self.n, CHUNK_BYTES // max(row_bytes, 1)))
        group = self._reopen(names, shape) if resume else None
        if group is None:
            if path.exists():
                shutil.rmtree(path)
            group = zarr.open_group(str(path), mode="w")
            group.create_array("attributions", shape=(self.n, *shape), chunks=(self.rows, *shape), dtype="float32",
                               fill_value=np.nan)
            group.create_array("written", shape=(self.n,), chunks=(self.rows,), dtype="bool", fill_value=False)
            group.create_array("score", shape=(self.n,), chunks=(self.rows,), dtype="float64", fill_value=np.nan)
            group.create_array("target", shape=(self.n,), chunks=(self.rows,), dtype="int64", fill_value=-1)
            group.attrs.update({**meta, "inputs": names, "labels": labels, "shape": list(shape)})
        self.shape = tuple(shape)
        # its arrays, not the group: the group holds its attributes (every input's name and path) in memory
        self.data, self.written = group["attributions"], group["written"]
        self.score, self.target = group["score"], group["target"]
        self._buffer: dict[int, dict[int, np.ndarray]] = {}
        self._held = 0

    def _reopen(self, names: list[str], shape: tuple[int, ...]):
        """The existing store if it has these inputs and this result shape (``--resume``)."""
        import zarr

        try:
            group = zarr.open_group(str(self.path), mode="r+")
            if group.attrs.get("inputs") == names and tuple(group["attributions"].shape[1:]) == tuple(shape):
                self.rows = group["attributions"].chunks[0]
                return group
        except Exception as exc:  # noqa: BLE001 (missing or unreadable: written afresh)
            log.debug("store %s: written afresh (%s)", self.path, exc)
        return None

    def add(self, k: int, result: np.ndarray) -> None:
        chunk = k // self.rows
        rows = self._buffer.setdefault(chunk, {})
        rows[k] = np.asarray(result, dtype=np.float32)
        self._held += rows[k].nbytes
        start = chunk * self.rows
        if len(rows) == min(self.rows, self.n - start):
            self._flush(chunk)
        while self._held > BUFFER_BYTES and self._buffer:
            self._flush(max(self._buffer, key=lambda c: len(self._buffer[c])))

    def _flush(self, chunk: int) -> None:
        rows = self._buffer.pop(chunk)
        self._held -= sum(r.nbytes for r in rows.values())
        ks = sorted(rows)
        block = np.stack([rows[k] for k in ks])
        start = chunk * self.rows
        if ks == list(range(start, start + len(ks))) and len(ks) == min(self.rows, self.n - start):
            self.data[start:start + len(ks)] = block  # a whole chunk: written, never read back
            self.written[start:start + len(ks)] = True
        else:
            self.data.oindex[ks] = block
            self.written.oindex[ks] = True

    def close(self, index: _Index) -> None:
        """Write what is buffered, then the index of the run's ok results."""
        for chunk in sorted(self._buffer):
            self._flush(chunk)
        self.written[:] = index.written & self.written[:]
        self.score[:] = index.score
        self.target[:] = index.target


class _Index:
    """The rows of a store's ok results: written, score, target (arrays of the run's inputs)."""

    def __init__(self, n: int):
        self.written = np.zeros(n, bool)
        self.score, self.target = np.full(n, np.nan), np.full(n, -1, np.int64)

    def add(self, k: int, record: dict) -> None:
        self.written[k] = True
        self.score[k] = np.nan if record.get("score") is None else record["score"]
        self.target[k] = -1 if record.get("target") is None else record["target"]


class StoreWriter:
    """The stores of one run: :meth:`add` each ok result as it is saved, :meth:`close` at the end.

    ``inputs`` are the run's inputs (names, labels; :class:`~esegeta.io.datasets.InputRef` or
    :class:`~esegeta.io.loading.InputItem`); with ``resume`` an existing store of the same inputs and
    shape keeps its rows, and a kept result missing from it is read back from its ``.npy``."""

    def __init__(self, out: Path, inputs: list, resume: bool = False):
        self.out, self.inputs, self.resume = Path(out), inputs, resume
        self.stores: dict[str, _MethodStore] = {}
        self._row: dict[str, int] | None = None
        self._lock = threading.Lock()

    # the inputs' names, labels and paths, made when a store is created (a run of 20,000 inputs held them all)
    @property
    def names(self) -> list[str]:
        return [item.name for item in self.inputs]

    @property
    def labels(self) -> list[Any]:
        return [getattr(item, "label", None) for item in self.inputs]

    @property
    def paths(self) -> list[str | None]:
        return [str(item.path) if item.path is not None else None for item in self.inputs]

    def _rows(self) -> dict[str, int]:
        """Input name → row (kept once a result comes without its input's index)."""
        return self._row if self._row is not None else {name: k for k, name in enumerate(self.names)}

    def add(self, record: dict, result: np.ndarray, kind: str, index: int | None = None) -> bool:
        """Buffer an ok result for its method's store; False if it cannot go there (another shape).
        ``index``: its input's place in the run's inputs, where the caller knows it."""
        with self._lock:
            return self._add(record, result, kind, index)

    @staticmethod
    def relative(label: str) -> str:
        return str(store_path(Path("."), label))

    def _add(self, record: dict, result: np.ndarray, kind: str, index: int | None = None) -> bool:
        known = index is not None and 0 <= index < len(self.inputs) and self.inputs[index].name == record["input"]
        if not known and self._row is None:
            self._row = self._rows()
        label, k = record["label"], index if known else self._row.get(record["input"])
        if k is None:
            return False
        store = self.stores.get(label)
        if store is None:
            meta = {"method": record["method"], "label": label, "kind": kind}
            store = self.stores[label] = _MethodStore(store_path(self.out, label), self.names, self.labels,
                                                      {**meta, "paths": self.paths}, tuple(result.shape), self.resume)
        if tuple(result.shape) != store.shape:
            log.warning("store %s: %s has result shape %s, not %s: not in the store (its files hold it)", label,
                        record["input"], tuple(result.shape), store.shape)
            return False
        store.add(k, result)
        return True

    def close(self, runs, kinds: dict[str, str]) -> dict[str, str]:
        """Complete every store from the run's records, read once as they go (a run's records stay on
        disk: of each, only its row's score and target are kept, and a resumed one whole until its row is
        filled); method label → store folder (relative)."""
        index: dict[str, _Index] = {}
        resumed: dict[str, dict[int, dict]] = {}
        row_of = self._rows()  # for this pass only: gone before the report
        for r in runs:
            if r["status"] == "ok" and r["input"] in row_of:
                k = row_of[r["input"]]
                index.setdefault(r["label"], _Index(len(self.inputs))).add(k, r)
                if r.get("resumed"):
                    resumed.setdefault(r["label"], {})[k] = r
        for label, rows in resumed.items():
            self._fill_kept(label, rows, kinds)
        for label, store in self.stores.items():
            store.close(index.get(label, _Index(len(self.inputs))))
        return {label: self.relative(label) for label in self.stores}

    def _fill_kept(self, label: str, rows: dict[int, dict], kinds: dict[str, str]) -> None:
        """Rows of resumed results that the store lacks, read back from their ``.npy`` files."""
        resumed = {k: r for k, r in rows.items() if r.get("resumed")}
        if not resumed:
            return
        store = self.stores.get(label)
        if store is None:
            first = next(iter(resumed.values()))
            path = store_path(self.out, label)
            try:
                import zarr

                group = zarr.open_group(str(path), mode="r")
                shape = tuple(group["attributions"].shape[1:])
            except Exception:  # noqa: BLE001 (no store yet: its shape comes from the record)
                shape = tuple(first.get("shape") or ())
            meta = {"method": first["method"], "label": label, "kind": kinds.get(first["method"], "attribution"),
                    "paths": self.paths}
            store = self.stores[label] = _MethodStore(path, self.names, self.labels, meta, shape, True)
        present = store.written[:]
        for k, record in resumed.items():
            if present[k]:
                continue
            npy = record.get("files", {}).get("npy")
            if npy is None or not (self.out / npy).is_file():
                log.warning("store %s: the resumed result on %s has no .npy to read back: its row is empty",
                            label, record["input"])
                continue
            saved = np.load(self.out / npy)
            kind = kinds.get(record["method"], "attribution")
            store.add(k, saved if kind == "image" else self.inputs[k].model_order(saved))


def written_inputs(path: Path) -> set[str]:
    """The inputs whose rows a store holds (none if it is missing or unreadable)."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        names = group.attrs["inputs"]
        return {names[k] for k in np.flatnonzero(group["written"][:])}
    except Exception:  # noqa: BLE001 (a store that cannot be read holds nothing)
        return set()


@dataclass
class AttributionStore:
    """One method's results over a run's inputs, read lazily.

    ``attributions`` is the Zarr array ``(N, *shape)`` (slicing reads only the chunks needed);
    ``written`` marks the rows holding a result; ``inputs``, ``labels``, ``scores`` and
    ``targets`` are the index (a list or array per column, row ``k`` = input ``k``)."""
    path: Path
    group: Any

    @property
    def attributions(self):
        return self.group["attributions"]

    @property
    def written(self) -> np.ndarray:
        return self.group["written"][:]

    @property
    def scores(self) -> np.ndarray:
        return self.group["score"][:]

    @property
    def targets(self) -> np.ndarray:
        return self.group["target"][:]

    @property
    def inputs(self) -> list[str]:
        return list(self.group.attrs["inputs"])

    @property
    def paths(self) -> list[str | None]:
        return list(self.group.attrs["paths"])

    @property
    def labels(self) -> list[Any]:
        return list(self.group.attrs["labels"])

    @property
    def method(self) -> str:
        return self.group.attrs["method"]

    def __len__(self) -> int:
        return self.attributions.shape[0]

    def __getitem__(self, k: int) -> dict[str, Any]:
        """Row ``k``: input name, label, target, score and result (None where not written)."""
        written = bool(self.group["written"][k])
        return {"input": self.inputs[k], "label": self.labels[k], "target": int(self.group["target"][k]),
                "score": float(self.group["score"][k]),
                "attribution": np.asarray(self.attributions[k]) if written else None}

    def index(self):
        """The index as a pandas DataFrame (input, label, target, score, written)."""
        import pandas as pd

        return pd.DataFrame({"input": self.inputs, "label": self.labels, "target": self.targets,
                             "score": self.scores, "written": self.written})


def open_store(run_dir: str | Path, method: str) -> AttributionStore:
    """The store of ``method`` (its label, or its id when one entry has it) in a run's output folder."""
    import zarr

    run_dir = Path(run_dir)
    path = store_path(run_dir, method)
    if not path.is_dir():
        manifest = run_dir / "manifest.json"
        labels = set()
        if manifest.is_file():
            runs = json.loads(manifest.read_text(encoding="utf-8")).get("runs", [])
            labels = {r["label"] for r in runs if r.get("method") == method}
        if len(labels) == 1:
            path = store_path(run_dir, labels.pop())
        if not path.is_dir():
            have = sorted(p.name[:-5] for p in (run_dir / FOLDER).glob("*.zarr")) if (run_dir / FOLDER).is_dir() else []
            raise FileNotFoundError(f"no attribution store of {method!r} in {run_dir} (stores: {', '.join(have) or 'none'})")
    return AttributionStore(path, zarr.open_group(str(path), mode="r"))


__all__ = ["AttributionStore", "StoreWriter", "open_store", "store_path"]
