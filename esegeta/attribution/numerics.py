"""What precision a job computes in: fp32 that means fp32, and mixed precision only where measured safe.

- **TF32.** On Ampere and newer GPUs torch runs float32 convolutions in TF32 (10-bit mantissa)
  by default (``torch.backends.cudnn.allow_tf32`` is True): every method's numbers change
  silently, and ``shap.DeepExplainer`` fails its additivity check on the 3D sample.
  :func:`fp32_numerics` turns TF32 off for cuDNN and cuBLAS for the duration of a run (or of
  one :func:`esegeta.explain` call) and restores the caller's setting afterwards, unless
  ``runtime.tf32`` asks for it. The flags are process-wide, so a run sets them once around
  all its workers.
- **Mixed precision** (``runtime.amp``). Autocast runs a method in bf16 on the CPU and fp16 on
  CUDA; some methods keep their maps and axioms there and some do not (LRP rules divide by
  small sums). Whether a method is safe is its spec's measurement
  (:meth:`esegeta.spec.registry.MethodSpec.amp_safety`, from ``benchmarks/precision.py``;
  ``esegeta methods --json`` shows it): a method not shown safe in a precision runs in fp32 under ``amp``, and the manifest
  says why (:func:`precision_plan`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from esegeta.spec.registry import MethodSpec


# -- TF32 ---------------------------------------------------------------------------
@contextmanager
def fp32_numerics(tf32: bool = False):
    """float32 convolutions and matmuls in full float32 (``tf32=False``) or in TF32 (``True``),
    the caller's setting restored afterwards.

    torch has two APIs for these flags and refuses to read them through the old one once the
    new one was used (``fp32_precision``): the flags are set through whichever API reads
    cleanly in this process, so the caller's own reads keep working during and after."""
    try:
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # the process set its flags through the new API: keep to it
        with _fp32_precision("tf32" if tf32 else "ieee"):
            yield
        return
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextmanager
def _fp32_precision(value: str):
    backends = [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn]
    saved = [b.fp32_precision for b in backends]
    for backend in backends:
        backend.fp32_precision = value
    try:
        yield
    finally:
        for backend, before in zip(backends, saved):
            backend.fp32_precision = before


def tf32_in_effect(tf32: bool, device: torch.device) -> bool:
    """Whether a job on ``device`` computes in TF32 (only CUDA has it)."""
    return tf32 and device.type == "cuda"


# -- mixed precision ----------------------------------------------------------------
def amp_precision(device: torch.device) -> str:
    """The autocast precision on ``device``: fp16 on CUDA, bf16 elsewhere."""
    return "fp16" if device.type == "cuda" else "bf16"


@contextmanager
def autocast(name: str, device: torch.device):
    """Run under autocast for ``bf16``/``fp16``; ``fp32`` runs as is."""
    if name == "fp32":
        yield
        return
    dtype = torch.float16 if name == "fp16" else torch.bfloat16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


@dataclass(frozen=True)
class PrecisionPlan:
    """The precisions a job tries, in order, and why (recorded in the manifest)."""
    attempts: tuple[str, ...]
    reason: str


def precision_plan(spec: MethodSpec, device: torch.device, amp: bool) -> PrecisionPlan:
    """fp32 alone without ``amp``; with it, the device's reduced precision then fp32 (a failed
    or non-finite result is recomputed), or fp32 alone for a method not measured safe."""
    if not amp:
        return PrecisionPlan(("fp32",), "runtime.amp is off")
    reduced = amp_precision(device)
    safe, why = spec.amp_safety(reduced)
    if not safe:
        return PrecisionPlan(("fp32",), f"amp: not shown safe in {reduced} ({why}): ran in fp32")
    return PrecisionPlan((reduced, "fp32"), f"amp: measured safe in {reduced} ({why})")
