"""Whether a computed result can be called ``ok``: NaN is never a success, a flat map is suspect.

- A result holding NaN or Inf, or computed from a non-finite input or score, is ``failed``,
  with the cause traced back to where it came from: the input itself, the model's output on
  the input, or else the method (:func:`nonfinite_problem`).
- An all-zero or constant result is ``ok`` but carries a warning naming its likely cause
  (:func:`flat_result_warning`): a score of zero to explain, too few samples for a surrogate,
  or a gradient that vanishes at the input.
"""
from __future__ import annotations

import math
from typing import Any

import torch

#: Parameters that count the samples a method draws (LIME's, KernelSHAP's, GradientSHAP's...).
SAMPLE_COUNTS = ("n_samples", "num_samples", "nsamples", "max_evals", "num_masks")


def _count_nonfinite(tensor: torch.Tensor) -> str:
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    parts = [f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else ""]
    return " and ".join(p for p in parts if p) + f" of {tensor.numel()} values"


def _tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (tensor, dict, tuple or list, nested)."""
    if torch.is_tensor(output):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in _tensors(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in _tensors(v)]
    return []


#: Why an LRP rule's relevance overflows, and the fix (measured: Captum's LRP on MONAI's UNet, instance
#: norms and biased convolutions, freshly initialised: NaN in all 32,768 voxels of a 32³ input).
LRP_OVERFLOW = ("LRP's ε rule divides each layer's relevance by its output (Captum's ε is 1e-9): where outputs are "
                "near zero (biased convolutions, normalisation layers) the relevance grows by x/z at every layer and "
                "overflows float32 over a deep network; use zennit.LayerMapComposite with a stabiliser the size of "
                "the outputs, layer_map {\"Convolution\": {\"rule\": \"epsilon\", \"epsilon\": 0.25}, ...} "
                "(on MONAI's UNet: finite, Σ 1.08× its seed), or zennit.EpsilonPlus (finite; z+ on convolutions)")


def all_finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """Whether every value of ``t`` is finite, checked in chunks (``torch.isfinite`` makes a float
    temporary of its input's size: a whole volume for a 3D result)."""
    if not t.is_contiguous():  # a view: a flat one would be a copy
        return bool(torch.isfinite(t).all())
    return all(bool(torch.isfinite(part).all()) for part in t.view(-1).split(chunk))


def nonfinite_problem(result: torch.Tensor, x: torch.Tensor, model: torch.nn.Module,
                      score: float | None, axiom: str | None = None) -> str | None:
    """Why the result of a method on the single input ``x`` cannot be called ok, or None.

    A result with NaN or Inf fails, and so does any result on a non-finite input or with a
    non-finite explained ``score`` (a gradient may come out finite through a NaN forward pass,
    explaining nothing). The message names where the values came from: the input, the model's
    output, or the method (for an LRP method, ``axiom`` ``"conservation"``: the ε rule's overflow and the fix)."""
    if not all_finite(x):
        return (f"the input holds {_count_nonfinite(x)} (as explained: after loading and inputs.normalize, which "
                "spreads one NaN to every value); nothing computed from it can be trusted: fix or mask those values "
                "in the file before explaining")
    finite_score = score is None or math.isfinite(score)
    if all_finite(result) and finite_score:
        return None
    what = f"non-finite result ({_count_nonfinite(result)})" if finite_score else f"non-finite explained score ({score})"
    with torch.no_grad():
        outputs = _tensors(model(x))
    bad = next((t for t in outputs if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        return f"{what}: the model's output on this input holds {_count_nonfinite(bad)}"
    if axiom == "conservation":
        return f"{what}: the method produced it from a finite input and model output: {LRP_OVERFLOW}"
    return (f"{what}: the method produced it from a finite input and model output "
            "(e.g. a division by a zero sum; in reduced precision an overflow)")


def flat_result_warning(result: torch.Tensor, params: dict[str, Any], accepted: Any,
                        score: float | None) -> str | None:
    """A warning for an all-zero or constant ``result``, naming the likely cause; None otherwise.

    ``params`` are the call's parameters and ``accepted`` the names the method accepts (to
    tell a sampling method); ``score`` is the explained value on the unperturbed input."""
    if result.numel() == 0:
        return None
    low, high = float(result.min()), float(result.max())
    if low != high:
        return None
    what = "all zero" if high == 0 else f"constant ({high:.4g} everywhere)"
    if score == 0:
        cause = ("the explained score is 0 on the unperturbed input (with a wrapper: no pixel or voxel is "
                 "predicted in the target's class); choose another target")
    elif (count := next((name for name in SAMPLE_COUNTS if name in accepted), None)) is not None:
        drawn = params.get(count, "its default")
        cause = (f"too few samples ({count}: {drawn}): a surrogate (LIME, KernelSHAP) fitted with fewer samples "
                 f"than features (superpixels, feature-mask groups) has zero weights; raise {count}")
    else:
        cause = ("the gradient of the explained score vanishes at this input (saturated activations, inactive "
                 "ReLUs) or the method's layer or neuron does not influence the score")
    return f"the result is {what}: likely {cause}"
