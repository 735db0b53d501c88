"""Time limits for a job running in a thread, on any OS.

:func:`call_with_limit` runs a function in a fresh thread. At the deadline it stops it two ways:

- a forward-pre hook on every module of the model copy raises :class:`TimeLimitExceeded`
  at the next module call of that thread, so long loops over forward passes stop promptly
  (and upstream ``finally`` blocks remove their own hooks as the exception passes);
- :c:func:`PyThreadState_SetAsyncExc` raises it asynchronously in the thread, for Python
  code that calls no module.

:func:`cancel_all` stops every running call the same way at once (a run interrupted by a
signal); the calls raise :class:`Cancelled`, and none starts until :func:`arm` is called again.

A thread still busy ``grace_s`` after that (stuck in one long C call) is abandoned as a
daemon: the caller goes on and must not reuse the model copy it held. The hooks are removed
before :func:`call_with_limit` returns. :class:`TimeLimitExceeded` derives from
``BaseException`` so that upstream ``except Exception`` blocks do not swallow it.
"""
from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from esegeta.hooks import removing


class TimeLimitExceeded(BaseException):
    """A job ran past its time limit."""


class Cancelled(BaseException):
    """The run was interrupted (:func:`cancel_all`): the job's result is not computed."""


_cancelled = threading.Event()
_active: set[_LimitedCall] = set()
_active_lock = threading.Lock()


def arm() -> None:
    """Let calls run again (a run's start): undoes an earlier :func:`cancel_all`."""
    _cancelled.clear()


def cancel_all() -> None:
    """Stop every running :func:`call_with_limit` (they raise :class:`Cancelled`) and refuse new ones."""
    _cancelled.set()
    with _active_lock:
        calls = list(_active)
    for call in calls:
        call.expire(Cancelled)


class _LimitedCall:
    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.lock = threading.Lock()
        self.expired = False
        self.done = False
        self.fired = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread_id: int | None = None
        self.raises: type[BaseException] = TimeLimitExceeded

    def target(self) -> None:
        self.thread_id = threading.get_ident()
        try:
            try:
                value = self.fn()
            finally:
                with self.lock:
                    self.done = True
                    if self.fired:  # cancel an asynchronous exception not delivered yet
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id), None)
            self.result = value
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
            self.error = exc

    def check(self, module, args) -> None:
        """Forward-pre hook: stop this job's thread at its next module call after the deadline."""
        if self.expired and threading.get_ident() == self.thread_id:
            raise self.raises("time limit reached" if self.raises is TimeLimitExceeded else "interrupted")

    def expire(self, raises: type[BaseException] = TimeLimitExceeded) -> None:
        with self.lock:
            if self.expired:
                return
            self.expired, self.raises = True, raises
            if not self.done and self.thread_id is not None and not self.fired:
                self.fired = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id), ctypes.py_object(raises))


def call_with_limit(fn: Callable[[], Any], limit_s: float | None, modules: Iterable[Any] = (),
                    grace_s: float = 5.0, name: str = "esegeta-job") -> Any:
    """``fn()`` in a thread of its own, stopped after ``limit_s`` seconds (None: no limit).

    Returns its result or re-raises its exception; raises :class:`TimeLimitExceeded` when the
    limit passed before it finished. ``modules`` get the deadline hook while it runs; a thread
    still running ``grace_s`` after the limit is left behind (a daemon)."""
    call = _LimitedCall(fn)
    thread = threading.Thread(target=call.target, name=name, daemon=True)
    if _cancelled.is_set():
        raise Cancelled("interrupted")
    with removing() as handles:
        for module in modules:
            try:
                handles.append(module.register_forward_pre_hook(call.check))
            except (AttributeError, RuntimeError):  # e.g. a TorchScript module takes no hooks
                pass
        start = time.monotonic()
        with _active_lock:
            _active.add(call)
        try:
            thread.start()
            while thread.is_alive() and not call.expired and (limit_s is None or time.monotonic() - start < limit_s):
                thread.join(0.1 if limit_s is None else max(0.0, min(0.1, limit_s - (time.monotonic() - start))))
        finally:
            with _active_lock:
                _active.discard(call)
        if thread.is_alive():
            call.expire()
            thread.join(grace_s)
            if call.raises is Cancelled:
                raise Cancelled("interrupted")
            raise TimeLimitExceeded(f"stopped after its time limit of {limit_s:g} s "
                                    f"({time.monotonic() - start:.1f} s)")
    if call.error is not None:
        if isinstance(call.error, Cancelled):
            raise Cancelled("interrupted") from None
        if isinstance(call.error, TimeLimitExceeded):
            raise TimeLimitExceeded(f"stopped after its time limit of {limit_s:g} s") from None
        raise call.error
    return call.result
