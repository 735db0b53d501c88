"""A streamed run's memory, flat in the number of inputs (``benchmarks/rss_inputs.py`` measures it).

Issue 26 measured a streamed run's peak resident set growing with its inputs (632 → 738 → 934 MB
at 150 / 1,500 / 3,000 inputs of 1×128×128). The causes, and the measures:

- Every job asked its worker for the run's samples (all inputs of the first one's shape, one
  tensor: N inputs in memory, read through the cache) whether or not its method reads them; now
  only a method of a library whose record says ``reads_samples`` gets them
  (:func:`esegeta.run.job.compute`), and reading them fills no cache.
- :class:`Releaser`: the inputs' cache (:mod:`esegeta.io.datasets`, up to 256 MiB) was filled by
  the scan of every input before the first job and then kept, least recently used first, the
  inputs whose jobs had all ended: it grew with the inputs up to its budget. The scan now caches
  nothing and each input leaves the cache when its last job ends (jobs run input by input).
- What is held per input for the whole run is small and made in one go: the jobs are made as they
  are taken (:class:`esegeta.run.plan.Jobs`; a list of them, with their inputs' references and resume
  keys, was about 600 bytes an input), an input's reference is slotted and reads its name and path from
  its source (a dataset's are made when read), its digest is 32 bytes of one array
  (:class:`esegeta.io.datasets.Digests`; a string per input, made by the scan between its transient
  objects, pinned heap pages too), the stores hold no list of names, warnings are deduplicated per job.
- :class:`Trimmer`: memory freed inside glibc's heaps stays resident (a heap shrinks only from
  its top, and a run's small long-lived objects sit between the freed tensors);
  ``malloc_trim(0)`` returns every free page. It is called once the scan has read every input
  (:func:`trim`) and after every :data:`EVERY` finished jobs (``ESEGETA_MALLOC_TRIM_EVERY``; 0
  turns it off); elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sized
from functools import cache
from typing import Any

log = logging.getLogger("esegeta")

#: Finished jobs between two trims (a trim of a run's heaps takes about a millisecond).
EVERY = 100


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another OS or C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim() -> None:
    """Give the free pages of glibc's heaps back now (after :func:`esegeta.io.datasets.scan` has read
    every input once); nothing where there is no ``malloc_trim`` or it is turned off."""
    if _enabled_every() > 0:
        function = _malloc_trim()
        if function is not None:
            function(0)


def _enabled_every() -> int:
    text = os.environ.get("ESEGETA_MALLOC_TRIM_EVERY", "")
    return int(text) if text.strip().isdigit() else EVERY


class Trimmer:
    """``done()`` after each finished job; every ``every`` of them, the heaps are trimmed."""

    def __init__(self, every: int | None = None):
        self.every = _enabled_every() if every is None else every
        self._trim = _malloc_trim() if self.every > 0 else None
        self._count = 0
        self._lock = threading.Lock()

    def done(self) -> None:
        if self._trim is None:
            return
        with self._lock:
            self._count += 1
            due = self._count % self.every == 0
        if due:
            self._trim(0)


class Releaser:
    """The inputs' cache emptied as a run goes: jobs pass through :meth:`watch` as they are taken, and
    ``done(job)`` as each ends; an input whose jobs have all ended, and that no job still to be taken
    will read, leaves the cache.

    Jobs come in the order of their first input (:class:`esegeta.run.plan.Jobs`), so once a job whose
    first input is ``k`` is taken, no later job reads an input before ``k``: only the inputs of jobs
    taken and not ended, or ended at or after that mark, are counted (memory flat in the inputs)."""

    def __init__(self):
        self._left: dict[int, int] = {}  # input index -> its jobs taken and not ended
        self._items: dict[int, Any] = {}  # its reference
        self._ended: set[int] = set()  # jobs all ended, but a job still to come may read it
        self._mark = 0  # no job still to come reads an input before it
        self._lock = threading.Lock()

    def watch(self, jobs: Sized | Iterable[Any]) -> _Watched:
        """``jobs``, counted as they are taken (of the same ``len()``)."""
        return _Watched(self, jobs)

    def _through(self, jobs: Iterable[Any]) -> Iterator[Any]:
        for job in jobs:
            with self._lock:
                for k, item in job.items:
                    self._left[k] = self._left.get(k, 0) + 1
                    self._items[k] = item
                    self._ended.discard(k)
                gone = self._advance(job.items[0][0])
            self._release(gone)
            yield job
        with self._lock:
            gone = self._advance(float("inf"))
        self._release(gone)

    def done(self, job: Any) -> None:
        gone = []
        with self._lock:
            for k, _ in job.items:
                self._left[k] -= 1
                if self._left[k] <= 0:
                    del self._left[k]
                    if k < self._mark:
                        gone.append(self._items.pop(k))
                    else:
                        self._ended.add(k)
        self._release(gone)

    def _advance(self, mark: float) -> list[Any]:
        """Move the mark (callers lock); the inputs it leaves behind with every job ended."""
        self._mark = max(self._mark, mark)
        if not self._ended or min(self._ended) >= self._mark:
            return []
        behind = [k for k in self._ended if k < self._mark]
        self._ended.difference_update(behind)
        return [self._items.pop(k) for k in behind]

    @staticmethod
    def _release(items: list[Any]) -> None:
        for item in items:
            item.release()


class _Watched:
    """Jobs passing through a :class:`Releaser` (:meth:`Releaser.watch`)."""

    def __init__(self, releaser: Releaser, jobs: Iterable[Any]):
        self._releaser, self._jobs = releaser, jobs

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Any]:
        return self._releaser._through(self._jobs)
