"""Where and how a run's jobs execute: worker threads per device, the retry policy, the gate.

- :class:`Executor` runs jobs on ``threads_per_device`` worker threads per device, each with its
  own prepared replica of the model (:class:`Worker`). A worker's loop never dies: a job whose
  computation or delivery raises is handed to ``on_error``, which records it ``failed``.
- :class:`RetryPolicy` is the one rule for trying a job again: out of memory halves the method's
  internal batch parameter; a failure or a non-finite result under reduced precision moves on
  to the next precision (fp32).
- :class:`Gate` lets a method that patches torch for the whole process (``MethodSpec.exclusive``:
  TorchRay's ``torch.relu`` swap) run alone, the others side by side.

An interrupt (SIGINT/SIGTERM, :class:`esegeta.errors.Interrupted`) while jobs run stops the workers
taking jobs, stops the running computations (:func:`esegeta.run.timeouts.cancel_all`), waits for
the workers to deliver what had finished (so it is journaled) and re-raises.

Seeds, devices and intra-op threads: :mod:`esegeta.attribution.scheduling`; time limits: :mod:`esegeta.run.timeouts`.
"""
from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from esegeta.attribution import numerics, scheduling
from esegeta.attribution.prepare import PreparedModel, prepare
from esegeta.io.datasets import samples
from esegeta.run import timeouts

log = logging.getLogger("esegeta")


@dataclass(frozen=True)
class Attempted:
    """A job's successful attempt: its value, the precision and call settings it ran with."""
    value: Any
    precision: str
    oom_retries: int
    settings: Any
    fallback: str | None  # why a reduced precision was given up, or None


@dataclass(frozen=True)
class RetryPolicy:
    """Try ``precisions`` in order (``("bf16", "fp32")`` under amp, else ``("fp32",)``).

    ``run`` calls ``attempt(precision, settings)`` (the runner's settings are a
    :class:`~esegeta.spec.request.Request`). Out of memory: ``shrink(settings)`` (new settings with
    the internal batch halved, never changed in place; None when it cannot shrink) and again. Any other
    error, or a result ``finite`` rejects, under a precision that is not the last: the next one.
    The last precision's error propagates; its result is returned whether finite or not (the
    caller's verdict then fails it, naming the cause)."""
    precisions: tuple[str, ...] = ("fp32",)

    def run(self, attempt: Callable[[str, Any], Any], settings: Any, shrink: Callable[[Any], Any],
            finite: Callable[[Any], bool], notify: Callable[[str, str], None] = lambda kind, message: None
            ) -> Attempted:
        retries, fallback = 0, None
        for n, precision in enumerate(self.precisions):
            last = n == len(self.precisions) - 1
            while True:
                try:
                    value = attempt(precision, settings)
                except Exception as exc:
                    smaller = shrink(settings) if scheduling.is_out_of_memory(exc) else None
                    if smaller is not None:
                        settings, retries = smaller, retries + 1
                        notify("oom", "out of memory; retrying with a smaller batch")
                        continue
                    if last:
                        raise
                    fallback = f"failed in {precision} ({type(exc).__name__}: {exc}): recomputed in fp32"
                    notify("precision", f"failed under {precision} ({type(exc).__name__}: {exc}): recomputing in fp32")
                    break
                if last or finite(value):
                    return Attempted(value, precision, retries, settings, fallback)
                fallback = f"non-finite result in {precision}: recomputed in fp32"
                notify("precision", f"non-finite result under {precision}: recomputing in fp32")
                break
        raise AssertionError("unreachable: the last precision returns or raises")


class Gate:
    """A readers–writer lock: ``shared()`` jobs run side by side, an ``exclusive()`` job alone.

    A waiting exclusive job holds back new shared ones, so it is not starved."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()

    def enter(self, exclusive: bool):
        return self.exclusive() if exclusive else self.shared()


class Worker:
    """A worker thread's device and its own prepared replica of the model."""

    def __init__(self, device: torch.device, model: torch.nn.Module, inputs: list,
                 replica: PreparedModel | None = None):
        self.device = device
        self._model = model
        self._inputs = inputs
        self._replica = replica
        self._samples: torch.Tensor | None = None

    def replica(self, x: torch.Tensor) -> PreparedModel:
        if self._replica is None:
            self._replica = prepare(self._model, x[:1].to(self.device))
        return self._replica

    def samples(self) -> torch.Tensor:
        """The run's inputs as one batch (those shaped like the first), for methods that fit on data."""
        if self._samples is None:
            self._samples = samples(self._inputs).to(self.device)
        return self._samples

    def discard(self) -> None:
        """Forget the replica (after a timeout): the next job gets a fresh copy."""
        self._replica = None


class Executor:
    """Runs jobs (each with ``devices`` and ``exclusive``) on the workers of a run."""

    def __init__(self, devices: list[torch.device], threads_per_device: int, model: torch.nn.Module,
                 inputs: list, first: PreparedModel, tf32: bool = False):
        self.devices = devices
        self.threads_per_device = threads_per_device
        self.model, self.inputs, self.first, self.tf32 = model, inputs, first, tf32
        self.gate = Gate()
        self._pending = _Pending([])
        self._lock = threading.Lock()

    #: Seconds an interrupted run waits for its workers to stop before it leaves them behind.
    STOP_GRACE_S = 10.0

    def run(self, jobs: Iterable, compute: Callable[[Any, Worker], Any], on_done: Callable[[Any, Any], None],
            on_error: Callable[[Any, BaseException], None], devices: list[torch.device] | None = None) -> None:
        """``on_done(job, compute(job, worker))`` for every job; ``on_error(job, exc)`` if either raises.

        ``jobs`` may be made as they are taken (:class:`esegeta.run.plan.Jobs`); ``devices`` are then
        where they run (a list of jobs says it itself)."""
        if devices is None:
            jobs = list(jobs)
            devices = list(dict.fromkeys(d for j in jobs for d in j.devices))
        used = set(devices)
        workers = [Worker(d, self.model, self.inputs, self.first if d == self.devices[0] and n == 0 else None)
                   for d in dict.fromkeys([*self.devices, *devices]) for n in range(self.threads_per_device)
                   if d in used]
        self._pending = _Pending(jobs)
        cpu_workers = sum(w.device.type == "cpu" for w in workers)
        with scheduling.intra_op_threads(cpu_workers), numerics.fp32_numerics(self.tf32), _job_warnings():
            threads = [threading.Thread(target=self._loop, args=(w, compute, on_done, on_error),
                                        name=f"esegeta-worker-{n}", daemon=True) for n, w in enumerate(workers)]
            timeouts.arm()
            try:
                for t in threads:
                    t.start()
                for t in threads:
                    while t.is_alive():
                        t.join(0.5)
            except BaseException:  # SIGINT/SIGTERM (or any exit of the main thread): stop, keep what finished
                self.stop(threads)
                raise

    def stop(self, threads: list[threading.Thread]) -> None:
        """No new job; the running ones are stopped; wait (up to :attr:`STOP_GRACE_S`) for the workers."""
        with self._lock:
            left = self._pending.close()
        log.warning("interrupted: %d job(s) not started; stopping the running ones", left)
        timeouts.cancel_all()
        deadline = time.monotonic() + self.STOP_GRACE_S
        for t in threads:
            while t.is_alive() and time.monotonic() < deadline:
                try:
                    t.join(0.2)
                except KeyboardInterrupt:  # a second signal while stopping: the stop goes on
                    continue

    def _take(self, worker: Worker):
        with self._lock:
            return self._pending.take(worker.device)

    def _loop(self, worker: Worker, compute, on_done, on_error) -> None:
        while (job := self._take(worker)) is not None:
            try:
                with self.gate.enter(job.exclusive):
                    outcome = compute(job, worker)
                on_done(job, outcome)
            except timeouts.Cancelled:  # interrupted: not computed, not recorded
                return
            except (Exception, SystemExit) as exc:  # noqa: BLE001 (the loop never dies: the job is recorded failed)
                try:
                    on_error(job, exc)
                except Exception:  # noqa: BLE001
                    log.exception("%s: its failure could not be recorded", job.name)


class _Pending:
    """The jobs not started, in order, made as they are taken: :meth:`take` the first one a device may
    run (those it passes for other devices wait in a buffer); :meth:`close` drops the rest. Callers lock."""

    def __init__(self, jobs: Iterable):
        self._total = len(jobs) if isinstance(jobs, Sized) else None
        self._jobs: Iterator | None = iter(jobs)
        self._passed: deque = deque()  # made, passed by workers of other devices
        self._taken = 0

    def take(self, device: torch.device):
        job = next((j for j in self._passed if device in j.devices), None)
        if job is not None:
            self._passed.remove(job)
        while job is None and self._jobs is not None:
            job = next(self._jobs, None)
            if job is None:
                self._jobs = None
            elif device not in job.devices:
                self._passed.append(job)
                job = None
        self._taken += job is not None
        return job

    def close(self) -> int:
        """Drop the jobs not started; how many they were."""
        if self._jobs is None or self._total is None:  # (a generator of unknown length: those made)
            left = len(self._passed)
        else:
            left = self._total - self._taken
        self._passed.clear()
        self._jobs = None
        return left


_current_job = threading.local()


def attribute_warnings(label: str) -> None:
    """Warnings raised from now on in this thread are logged as ``label``'s (a job's thread), each
    message once."""
    _current_job.label = label
    _current_job.seen = set()  # a job's messages, gone with it (a run-wide set grew with the jobs)


@contextmanager
def _job_warnings():
    """Log each job's warnings (once per job and message) at debug level.

    ``warnings.catch_warnings`` is process-wide, so it is entered once around all workers and
    warnings are attributed to the job running in the thread that raised them."""
    outside: set[str] = set()  # the messages of threads that run no job
    outside_lock = threading.Lock()

    def show(message, category, filename, lineno, file=None, line=None):
        label = getattr(_current_job, "label", "esegeta")
        first = str(message).split("\n")[0]
        seen = getattr(_current_job, "seen", None)
        with outside_lock if seen is None else nullcontext():
            seen = outside if seen is None else seen
            if first in seen:
                return
            seen.add(first)
        log.debug("%s: warning: %s", label, first)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield
