"""What one method call costs before it runs: model passes per input, and a time from them.

A method's cost is counted in *rows*: one input (one sample of the batch) through the model's
forward pass is one forward row; backpropagating one such row is one backward row. Integrated
Gradients with ``n_steps=50`` is 50 forward and 50 backward rows per input, whatever its
``internal_batch_size`` (which only groups the rows into fewer, larger calls); Occlusion is one
forward row per window position plus the unperturbed input; RISE one per mask. The counts
follow each library's own algorithm and defaults (the upstream signature's defaults, then
esegeta's input-derived defaults, then the entry's parameters), so they change with them.

Where the count depends on something only the run knows (a layer's channel count that was not
given, the number of superpixels a segmentation function finds, an optimiser that may stop
early), :class:`Passes` says so in ``note`` and ``exact`` is False; a count that cannot be
estimated at all is ``None``.

- :func:`expected_passes`: the :class:`Passes` of one entry on inputs shaped like ``x``.
- :func:`estimated_seconds`: forward rows × the measured seconds of one forward row, backward
  rows × twice that (a backward pass costs about two forward passes).

Every registered method states its formula, ``MethodSpec.passes`` (``formula(values, x,
layer_shape) -> Passes``), in its adapter's table; this module holds the building blocks the
tables use (:func:`gradient`, :func:`forward_only`, :func:`steps`, :func:`forward_steps`, and the
counting helpers) and names no method. It imports no torch: adapters build their tables from it
while ``esegeta methods`` lists the registry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from esegeta.spec.params import with_defaults

if TYPE_CHECKING:
    import torch

#: A backward row costs about this many forward rows (the usual rule of thumb for convolutions).
BACKWARD_COST = 2.0


@dataclass(frozen=True)
class Passes:
    """Model rows one method call needs per input: ``forward`` and ``backward`` (None: unknown).

    ``exact`` is False when the count is an estimate (``note`` says why)."""
    forward: int | None
    backward: int | None
    exact: bool = True
    note: str = ""

    @property
    def known(self) -> bool:
        return self.forward is not None

    def times(self, factor: int) -> "Passes":
        """These passes repeated ``factor`` times (a noise tunnel's samples, augmentations)."""
        return Passes(None if self.forward is None else self.forward * factor,
                      None if self.backward is None else self.backward * factor, self.exact, self.note)

    def text(self) -> str:
        """``"50 forward + 50 backward rows"``, ``"~8,001 forward rows (...)"`` or ``"unknown (...)"``."""
        if self.forward is None:
            return f"unknown ({self.note})" if self.note else "unknown"
        approx = "" if self.exact else "~"
        back = f" + {approx}{self.backward:,} backward" if self.backward else ""
        note = f" ({self.note})" if self.note else ""
        return f"{approx}{self.forward:,} forward{back} rows{note}"

    def as_dict(self) -> dict[str, Any]:
        return {"forward": self.forward, "backward": self.backward, "exact": self.exact, "note": self.note}


Formula = Callable[[Mapping[str, Any], "torch.Tensor", "Sequence[int] | None"], Passes]


def gradient(values, x, layer_shape) -> Passes:
    """One forward and one backward row (a gradient, a modified gradient, one relevance pass)."""
    return Passes(1, 1)


def forward_only(values, x, layer_shape) -> Passes:
    """One forward row (activations read, no gradient)."""
    return Passes(1, 0)


def steps(name: str) -> Formula:
    """One forward and one backward row per step of ``name`` (``n_steps``, ``n_samples``, ``n_iter``...)."""
    def formula(values, x, layer_shape) -> Passes:
        n = values.get(name)
        return Passes(int(n), int(n)) if count(n) else Passes(None, None, False, f"{name} not known")
    return formula


def forward_steps(name: str, plus: int = 0) -> Formula:
    """One forward row per ``name`` (masks, samples, evaluations), plus ``plus`` unperturbed rows."""
    def formula(values, x, layer_shape) -> Passes:
        n = values.get(name)
        if not count(n):
            return Passes(None, None, False, f"{name} is {n!r}: known at run time only")
        return Passes(int(n) + plus, 0)
    return formula


def count(v: Any) -> bool:
    """Whether ``v`` is a count a formula can use (a finite number >= 0, not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def n_baselines(values: Mapping[str, Any], name: str = "baselines") -> int:
    """How many baselines a (list of) JSON baseline(s) or a tensor of baselines stands for."""
    import torch  # a formula runs with a tensor at hand; listing the registry imports no torch

    b = values.get(name)
    if isinstance(b, list):
        return max(1, len(b))
    if torch.is_tensor(b) and b.dim() >= 1:
        return max(1, int(b.shape[0]))
    return 1


def baseline_pairs(name: str = "baselines") -> Formula:
    """Inputs and baselines in one batch (DeepLift's rules): 2 rows each way per baseline of ``name``."""
    def formula(values, x, layer_shape) -> Passes:
        rows = 2 * n_baselines(values, name)
        return Passes(rows, rows)
    return formula


def n_features(values: Mapping[str, Any], x: torch.Tensor, name: str = "feature_mask") -> int:
    """Features a perturbation method switches off one by one: a grid's blocks, a tensor mask's
    distinct ids, else every element of one input (Captum's default)."""
    import torch

    mask = values.get(name)
    spatial = list(x.shape[2:])
    if isinstance(mask, dict) and isinstance(mask.get("grid"), list) and len(mask["grid"]) == len(spatial):
        return math.prod(-(-s // int(b)) for s, b in zip(spatial, mask["grid"]))
    if torch.is_tensor(mask) and mask.device.type != "meta":
        return int(torch.unique(mask).numel())
    return math.prod(x.shape[1:])


def windows(shape: Sequence[int], window: Sequence[int], stride: Sequence[int], ceil: bool = False) -> int:
    """Window positions per axis multiplied; ``ceil``: a last, partial step counts too (Captum's
    Occlusion: ``ceil((size - window) / stride) + 1``)."""
    step = (lambda a, b: -(-a // b)) if ceil else (lambda a, b: a // b)
    return math.prod(max(0, step(s - w, max(1, st))) + 1 for s, w, st in zip(shape, window, stride))


def as_list(v: Any, n: int) -> list[int] | None:
    """``v`` as ``n`` integers (one number repeated, or a list of ``n`` counts), or None."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [int(v)] * n
    if isinstance(v, (list, tuple)) and len(v) == n and all(count(e) for e in v):
        return [int(e) for e in v]
    return None


def resolved_values(spec, params: Mapping[str, Any], x: torch.Tensor) -> dict[str, Any]:
    """The values a call will use: upstream defaults, then esegeta's defaults from ``x``, then ``params``."""
    try:
        upstream = {n: p.default for n, p in spec.parameters().items() if p.default is not p.empty}
    except Exception:  # noqa: BLE001 (an adapter that cannot list its parameters: the entry's values only)
        upstream = {}
    return {**upstream, **with_defaults(spec, params, x)}


def expected_passes(spec, params: Mapping[str, Any], x: torch.Tensor, *,
                    noise_tunnel: Mapping[str, Any] | None = None, layer_shape: Sequence[int] | None = None) -> Passes:
    """The model rows one call of ``spec`` with ``params`` needs per input shaped like ``x`` (a batch,
    any device, ``meta`` included: only its shape is read). ``layer_shape`` is the method's layer
    output shape when known (per-channel methods count by it)."""
    if spec.passes is None:
        return Passes(None, None, False, f"no cost formula for {spec.id}")
    passes = spec.passes(resolved_values(spec, params, x), x, layer_shape)
    if noise_tunnel is not None:
        samples = noise_tunnel.get("nt_samples", 5)
        passes = passes.times(int(samples)) if count(samples) else Passes(None, None, False, "nt_samples not known")
    return passes


def estimated_seconds(passes: Passes, forward_row_seconds: float) -> float | None:
    """Seconds the call should take per input, from the measured seconds of one forward row."""
    if passes.forward is None:
        return None
    return (passes.forward + BACKWARD_COST * (passes.backward or 0)) * forward_row_seconds


def duration_text(seconds: float | None) -> str:
    """``"~40 ms"``, ``"~12 s"``, ``"~12 min"``, ``"~3.1 h"``; ``"unknown"`` for None."""
    if seconds is None:
        return "unknown"
    if seconds < 1:
        return f"~{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"~{seconds:.0f} s"
    if seconds < 7200:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"
