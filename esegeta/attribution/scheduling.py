"""How a run's (method, input) jobs execute: devices, worker threads, seeds, precision, memory.

- **Devices and workers.** ``runtime.devices`` names one or more devices; each gets
  ``threads_per_device`` worker threads (threads in one process: torch releases the GIL).
  Every worker holds its own prepared replica of the model: methods set hooks on the model
  and the prepared copy counts call sites per forward, so two jobs must never share a copy.
- **Seeds.** Each job draws from its own seed, :func:`job_seed` of (run seed, method index,
  input index), whatever worker runs it and whatever runs beside it. torch's global RNG is
  shared by all threads, so a job's torch random calls (``torch.randn``, ``normal_``, ...)
  get a per-job generator through a thread-local :class:`torch.overrides.TorchFunctionMode`
  (:class:`JobRandomness`); methods that may draw from numpy's or Python's global RNG (their
  spec's ``uses_global_rng``, by default their library's) hold one lock for their whole run,
  with both seeded from the job seed.
- **Threads.** CPU workers share the cores: each gets ``cpu_count // workers`` intra-op
  threads (:func:`intra_op_threads`). Results are bitwise identical whatever the number of
  workers at the same intra-op thread count; another thread count only changes the float
  summation order (measured: 4e-7 absolute on GradientShap of the sample digits).
- **Precision** (TF32, ``runtime.amp``): see :mod:`esegeta.attribution.numerics`.
- **Out of memory**: the method's internal batch parameter (its library's ``batch_params``) is
  halved and the job retried, down to one (:func:`esegeta.spec.params.halve_batch`).
"""
from __future__ import annotations

import os
import random
import threading
from contextlib import contextmanager

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from esegeta.errors import ConfigError

#: torch functions and tensor methods that draw random numbers and take ``generator=``.
RANDOM_OPS = frozenset({
    "rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson", "binomial",
    "rand_like", "randn_like", "randint_like", "_standard_gamma", "_sample_dirichlet",
    "normal_", "uniform_", "bernoulli_", "random_", "exponential_", "cauchy_", "geometric_", "log_normal_",
})

# -- devices ------------------------------------------------------------------------
def resolve_device(name: str | None, where: str = "runtime.devices") -> torch.device:
    """``auto`` → the first CUDA device if there is one, else the CPU; errors name ``where``.

    Only devices that can run here are accepted: the CPU, a present CUDA device, and Apple's
    ``mps`` or Intel's ``xpu`` where torch has them. ``meta`` (shapes without values) and the
    backends torch was not built with are refused, with what to use instead."""
    if name in (None, "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    usable = "use 'auto', 'cpu' or 'cuda:N'"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(where, f"{name!r} is not a device; {usable}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(where, f"{name} requested but CUDA is not available here; use 'cpu' or 'auto'")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(where, f"{name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if device.type == "meta":
        raise ConfigError(where, f"{name!r} holds shapes without values: nothing can be computed on it; {usable}")
    backend = getattr(torch, device.type, None) if device.type in ("mps", "xpu") else None
    if backend is None or not backend.is_available():
        raise ConfigError(where, f"{name!r}: torch cannot run on {device.type} devices here; {usable}")
    return device


def resolve_devices(names: str | list[str] | None, where: str = "runtime.devices") -> list[torch.device]:
    """The devices jobs run on: ``auto`` is every CUDA device, or the CPU where there is none."""
    if names in (None, "auto"):
        if torch.cuda.is_available():
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        return [torch.device("cpu")]
    if isinstance(names, str):
        return [resolve_device(names, where)]
    if not names:
        raise ConfigError(where, "an empty list names no device; use 'auto', 'cpu', 'cuda:N' or a list of them")
    devices: list[torch.device] = []
    for i, name in enumerate(names):
        if name == "auto":
            raise ConfigError(f"{where}[{i}]", "'auto' stands alone, not in a list")
        device = resolve_device(name, f"{where}[{i}]")
        if device not in devices:
            devices.append(device)
    return devices


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def intra_op_threads(cpu_workers: int):
    """torch's intra-op threads shared out among the CPU workers (at least one each), restored after."""
    before = torch.get_num_threads()
    if cpu_workers > 1:
        torch.set_num_threads(max(1, cpu_count() // cpu_workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- seeds --------------------------------------------------------------------------
def job_seed(seed: int, method_index: int, input_index: int) -> int:
    """A job's own 63-bit seed, a function of (run seed, method index, input index) only."""
    state = np.random.SeedSequence([seed % 2**63, method_index, input_index]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class _OwnedLock:
    """A lock that remembers its holder, so that the holder's release can come from another
    thread (the worker of a job stopped at its time limit) and never frees someone else's hold."""

    def __init__(self):
        self._cond = threading.Condition()
        self._owner: object | None = None

    def acquire(self, owner: object) -> None:
        with self._cond:
            while self._owner is not None:
                self._cond.wait()
            self._owner = owner

    def release(self, owner: object) -> None:
        with self._cond:
            if self._owner is owner:
                self._owner = None
                self._cond.notify()


_global_rng = _OwnedLock()


class JobRandomness(TorchFunctionMode):
    """Within one thread, torch's random calls draw from this job's generators (one per device).

    A ``TorchFunctionMode`` is thread-local, so jobs in other threads are not affected; a call
    that passes its own ``generator`` keeps it. With ``global_rng`` the job also holds the
    process-wide lock for numpy's and Python's global RNGs and seeds them.
    """

    def __init__(self, seed: int, global_rng: bool = False):
        super().__init__()
        self.seed = seed
        self.global_rng = global_rng
        self.generators: dict[torch.device, torch.Generator] = {}

    def __enter__(self):
        if self.global_rng:
            _global_rng.acquire(self)
            np.random.seed(self.seed % 2**32)
            random.seed(self.seed)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self.release()

    def release(self) -> None:
        """Give up the global-RNG lock if this job holds it (also called, from the worker, for a
        job stopped at its time limit: it may have been stopped before its own release)."""
        _global_rng.release(self)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if device.type not in ("cpu", "cuda"):
            return None
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in RANDOM_OPS and kwargs.get("generator") is None:
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            device = tensor.device if tensor is not None else torch.device(kwargs.get("device") or
                                                                           torch.get_default_device())
            generator = self._generator(device)
            if generator is not None:
                kwargs = {**kwargs, "generator": generator}
        return func(*args, **kwargs)


# -- out of memory ------------------------------------------------------------------
def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
