"""Progress inside one method call: forward passes done out of those expected, with an ETA.

A long method (SHAP, LIME, Occlusion, RISE, ...) is one upstream call: nothing outside it moves
while it runs. :func:`tracked` counts what it does from the outside, with a forward hook on the
prepared model that adds the batch size of every forward pass (so a batched pass of 64
perturbed inputs counts 64, as the expected total does), and shows it:

- in the console: a tqdm bar (``passes``) that appears only once a call has run for
  :data:`BAR_AFTER_S` seconds, with tqdm's own rate and ETA; upstream libraries' bars stay
  silenced (the command line sets ``TQDM_DISABLE``; esegeta's bars pass ``disable=None``);
- in the log (``esegeta.log`` and the console): a line every :data:`LOG_EVERY_S` seconds,
  ``IG on x: 1,200/3,200 forward passes (38 %), 12 s, ETA 20 s``, and one at the end of a call
  that logged any.

The expected total comes from :mod:`esegeta.spec.cost` when it knows the method, plus the one pass
per input on the unperturbed input that every run makes (a wrapper's frozen mask or the explained
score); else the bar and the log count without a total. A count that passes its total drops the
total (never "3/2, 150 %"). The ETA uses the rate since the first counted pass (set-up before it,
e.g. superpixels or baselines, is not extrapolated) and needs two counted passes. The hook is removed
when the call ends, even on error.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from esegeta.attribution import conservation
from esegeta.spec import cost
from esegeta.hooks import removing

log = logging.getLogger("esegeta")
#: Seconds a call runs before its console bar appears (short calls stay quiet).
BAR_AFTER_S = 2.0
#: Seconds between two log lines of one call.
LOG_EVERY_S = 10.0


def _rows(args: tuple) -> int:
    """The batch size of a forward pass: the first tensor argument's first axis (1 if none)."""
    for a in args:
        if torch.is_tensor(a):
            return int(a.shape[0]) if a.ndim else 1
        if isinstance(a, (list, tuple)) and a:
            return _rows(tuple(a))
    return 1


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """The forward passes of one call, out of ``expected`` (None: unknown), shown as they happen."""

    def __init__(self, name: str, expected: int | None = None, *, bar_after_s: float | None = None,
                 log_every_s: float | None = None, clock=time.perf_counter):
        self.name = name
        self.expected = expected if expected and expected > 0 else None
        self.done = 0
        self.bar_after_s = BAR_AFTER_S if bar_after_s is None else bar_after_s
        self.log_every_s = LOG_EVERY_S if log_every_s is None else log_every_s
        self._clock = clock
        self._start = clock()
        self._next_log = self._start + self.log_every_s
        self._first: tuple[float, int] | None = None  # (time, count) at the first counted pass
        self._exceeded: int | None = None  # the total that the count passed
        self._logged = 0
        self._bar = None
        self._lock = threading.Lock()

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    def eta(self) -> float | None:
        """Seconds left at the rate since the first counted pass (None without a total, or before a
        second pass gives a rate)."""
        if self.expected is None or self._first is None or self.done <= self._first[1]:
            return None
        since = self._clock() - self._first[0]
        return since * max(0, self.expected - self.done) / (self.done - self._first[1])

    def line(self) -> str:
        """``name: done/expected forward passes (pct), elapsed, ETA``."""
        elapsed = _duration(self.elapsed)
        if self.expected is None:
            more = f" (more than the {self._exceeded:,} expected)" if self._exceeded else ""
            return f"{self.name}: {self.done:,} forward passes{more}, {elapsed}"
        pct = 100.0 * self.done / self.expected
        eta = self.eta()
        tail = f", ETA {_duration(eta)}" if eta is not None and self.done < self.expected else ""
        return f"{self.name}: {self.done:,}/{self.expected:,} forward passes ({pct:.0f} %), {elapsed}{tail}"

    def add(self, n: int = 1) -> None:
        """Count ``n`` more passes; update the bar and log when due (never raises)."""
        try:
            with self._lock:
                self.done += n
                now = self._clock()
                if self._first is None:
                    self._first = (now, self.done)
                if self.expected is not None and self.done > self.expected:  # the estimate was short
                    self._exceeded, self.expected = self.expected, None
                    if self._bar is not None:
                        self._bar.total = None
                        self._bar.refresh()
                if self._bar is None and now - self._start >= self.bar_after_s:
                    self._open_bar()
                if self._bar is not None:
                    self._bar.update(n)
                if now >= self._next_log:
                    self._next_log = now + self.log_every_s
                    self._logged += 1
                    log.info("%s", self.line())
        except Exception as exc:  # noqa: BLE001 (progress must never break a method)
            log.debug("progress of %s: %s", self.name, exc)

    def _open_bar(self) -> None:
        from tqdm import tqdm

        # disable=None: shown on a terminal, off otherwise; TQDM_DISABLE (upstream bars) does not apply
        self._bar = tqdm(total=self.expected, initial=self.done, desc=self.name, unit="pass", leave=False,
                         disable=None, dynamic_ncols=True)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if self._logged:
                log.info("%s: %s forward passes in %s", self.name, f"{self.done:,}", _duration(self.elapsed))


def expected_passes(request: Any, x: torch.Tensor, with_scores: bool = True) -> int | None:
    """The forward rows a call of ``request`` on the batch ``x`` is expected to make (the per-input
    count of :func:`esegeta.spec.cost.expected_passes` times the batch size, plus one row per input
    on the unperturbed input when ``with_scores``: the wrapper's frozen mask or the explained score
    that a run records), or None when it is not known (no formula, a count only the run knows, a
    patched call)."""
    if getattr(request, "patch", None) is not None:
        return None
    try:
        passes = cost.expected_passes(request.spec, request.params, x, noise_tunnel=request.noise_tunnel)
    except Exception as exc:  # noqa: BLE001 (an estimate is optional: the bar counts without a total)
        log.debug("cost of %s: %s", getattr(getattr(request, "spec", None), "id", request), exc)
        return None
    if not passes.forward:
        return None
    # a run's scores: one row on the unperturbed input, and the axiom check's baselines where it applies
    extra = 1 + conservation.check_rows(request.spec, cost.resolved_values(request.spec, request.params, x),
                                        request.noise_tunnel) if with_scores else 0
    return (passes.forward + extra) * int(x.shape[0])


@contextmanager
def tracked(model: nn.Module, name: str, expected: int | None = None, **options: Any) -> Iterator[Progress]:
    """Count the forward passes of ``model`` while the block runs (see :class:`Progress`); the
    hook is removed at the end, even on error. A model that takes no hooks (TorchScript) runs
    uncounted."""
    progress = Progress(name, expected, **options)
    with removing() as handles:
        try:
            handles.append(model.register_forward_hook(lambda module, args, output: progress.add(_rows(args))))
        except Exception as exc:  # noqa: BLE001 (e.g. a ScriptModule: no progress, the call still runs)
            log.debug("progress of %s: no forward hook (%s)", name, exc)
        try:
            yield progress
        finally:
            progress.close()
