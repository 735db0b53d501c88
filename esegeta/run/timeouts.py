"""Time limits for a job running in a thread, on any OS.

:func:`call_with_limit` runs a function in a fresh thread. At the deadline it stops it two ways:

- a forward-pre hook on every module of the model copy raises :class:`TimeLimitExceeded`
  at the next module call of that thread, so long loops over forward passes stop promptly
  (and upstream ``finally`` blocks remove their own hooks as the exception passes);
- :c:func:`PyThreadState_SetAsyncExc` raises it asynchronously in the thread, for Python
  code that calls no module.

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
            raise TimeLimitExceeded("time limit reached")

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            if not self.done and self.thread_id is not None and not self.fired:
                self.fired = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id),
                                                           ctypes.py_object(TimeLimitExceeded))


def call_with_limit(fn: Callable[[], Any], limit_s: float | None, modules: Iterable[Any] = (),
                    grace_s: float = 5.0, name: str = "esegeta-job") -> Any:
    """``fn()`` in a thread of its own, stopped after ``limit_s`` seconds (None: no limit).

    Returns its result or re-raises its exception; raises :class:`TimeLimitExceeded` when the
    limit passed before it finished. ``modules`` get the deadline hook while it runs; a thread
    still running ``grace_s`` after the limit is left behind (a daemon)."""
    call = _LimitedCall(fn)
    thread = threading.Thread(target=call.target, name=name, daemon=True)
    with removing() as handles:
        for module in modules if limit_s is not None else ():
            try:
                handles.append(module.register_forward_pre_hook(call.check))
            except (AttributeError, RuntimeError):  # e.g. a TorchScript module takes no hooks
                pass
        start = time.monotonic()
        thread.start()
        thread.join(limit_s)
        if thread.is_alive():
            call.expire()
            thread.join(grace_s)
            raise TimeLimitExceeded(f"stopped after its time limit of {limit_s:g} s "
                                    f"({time.monotonic() - start:.1f} s)")
    if call.error is not None:
        if isinstance(call.error, TimeLimitExceeded):
            raise TimeLimitExceeded(f"stopped after its time limit of {limit_s:g} s") from None
        raise call.error
    return call.result
