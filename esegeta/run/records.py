"""A run's records, kept on disk: memory flat in the number of inputs (issue 26).

A record (one (method, input) result: status, files, score, warnings...) is about 1.5 KB of Python
objects; a run of 20,000 inputs held 30 MB of them until its manifest was written. :class:`Records`
holds them in an anonymous temporary file (one JSON line each, as the journal writes them) with an
index of where each one starts, (input index, method position) → offset: eight bytes a record.

It is a read-only :class:`~collections.abc.Sequence` of dicts in the manifest's order (input by
input, methods in config order), so ``manifest["runs"]`` *is* a ``Records``: writing the manifest
(:func:`esegeta.io.outputs.save_json` encodes it record by record), the stores, the report, the
evaluation and ``RunResult.runs`` read the records from the file as they go, never all at once.
A record read is a fresh dict: changing it changes nothing on disk (:meth:`put` replaces one).
"""
from __future__ import annotations

import json
import tempfile
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from esegeta.io import outputs


class Records(Sequence):
    """The records of a run of ``inputs`` inputs × ``methods`` method entries; :meth:`put` each one."""

    def __init__(self, inputs: int, methods: int):
        self._at = np.full((max(inputs, 0), max(methods, 0)), -1, np.int64)  # offset in the spool, -1: none
        self._status = np.full(self._at.shape, -1, np.int8)  # index in self._names, -1: no record
        self._names: list[str] = []  # the statuses seen ("ok", "failed", "timeout", ...)
        self._held: dict[tuple[int, int], dict] = {}  # records the spool could not take (a full /tmp)
        self._spool = None
        self._lock = threading.Lock()

    def put(self, key: tuple[int, int], record: dict[str, Any]) -> None:
        """Keep ``record`` as the one of ``key`` = (input index, method position), replacing any earlier."""
        line = (outputs.json_line(record) + "\n").encode("utf-8")
        with self._lock:
            try:
                if self._spool is None:
                    self._spool = tempfile.TemporaryFile("w+b")
                    weakref.finalize(self, self._spool.close)  # closed (and gone) with the records
                self._spool.seek(0, 2)
                offset = self._spool.tell()
                self._spool.write(line)
                self._at[key] = offset
                self._held.pop(key, None)
            except OSError:  # the temporary folder is full: this one stays in memory
                self._at[key] = -1
                self._held[key] = json.loads(line)
            status = str(record.get("status"))
            if status not in self._names:
                self._names.append(status)
            self._status[key] = self._names.index(status)

    def with_status(self, status: str) -> int:
        """How many records have ``status``."""
        with self._lock:
            return int((self._status == self._names.index(status)).sum()) if status in self._names else 0

    def _keys(self) -> np.ndarray:
        """The flat indices of the records present, in manifest order (row-major: input, then method)."""
        with self._lock:
            return np.flatnonzero(self._status >= 0)

    def _read(self, flat: int) -> dict[str, Any]:
        key = tuple(int(i) for i in np.unravel_index(flat, self._at.shape))
        with self._lock:
            if key in self._held:
                return json.loads(json.dumps(self._held[key]))
            self._spool.seek(int(self._at[key]))
            return json.loads(self._spool.readline())

    def __len__(self) -> int:
        with self._lock:
            return int((self._status >= 0).sum())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for flat in self._keys():
            yield self._read(flat)

    def __getitem__(self, index):
        keys = self._keys()
        if isinstance(index, slice):
            return [self._read(flat) for flat in keys[index]]
        return self._read(keys[index])

    def of_inputs(self, first: int) -> Iterator[dict[str, Any]]:
        """The records of the first ``first`` inputs, in manifest order (the overview, the report)."""
        for flat in self._keys():
            if flat // max(self._at.shape[1], 1) >= first:
                return
            yield self._read(flat)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return other is self or list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Records: {len(self)} run record(s), read from disk>"

    def close(self) -> None:
        with self._lock:
            if self._spool is not None:
                self._spool.close()
                self._spool = None


class InputEntries(Sequence):
    """The manifest's ``inputs``: name, path, shape (and label) of each of a run's inputs, made as they
    are read (a dict per input held for the whole run would grow with the inputs, as records did)."""

    def __init__(self, inputs: Sequence[Any]):
        self._inputs = inputs

    def __len__(self) -> int:
        return len(self._inputs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._entry(item) for item in self._inputs[index]]
        return self._entry(self._inputs[index])

    @staticmethod
    def _entry(item: Any) -> dict[str, Any]:
        return {"name": item.name, "path": str(item.path), "shape": list(item.shape[1:]),
                **({"label": item.label} if item.label is not None else {})}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


__all__ = ["InputEntries", "Records"]
