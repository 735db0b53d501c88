"""Wrapped segmenters explained in one upstream call for a whole batch of inputs.

A wrapper freezes its masks on one input (:func:`esegeta.attribution.wrappers.build`). Explaining ``B``
inputs of one shape in one call needs a *batched wrapped view*: ``B`` frozen masks, and for
every row the wrapped forward pass sees, the input that row belongs to. The upstream methods
expand a batch into ``N`` rows in different ways, so the row → input mapping is declared per
method, as ``batch_layout`` in its adapter's table (:class:`esegeta.spec.registry.MethodSpec`),
never guessed:

- ``"rows"``: ``N == B``, row ``r`` is input ``r`` (every forward pass the method makes sees
  the batch as given: Saliency, Guided Backprop, LRP, zennit's composites, grad-cam's gradient
  CAMs, ...);
- ``"tile"``: ``N == k·B``, row ``r`` is input ``r mod B`` (the method concatenates ``k``
  copies of the batch: Captum's Integrated Gradients over its steps, DeepLift with its
  baselines, Occlusion and Feature Ablation with ``perturbations_per_eval``, ...);
- ``"per_input"``: one upstream call per input, each with its own wrapper (declared by every
  method with randomness or rules that amplify the batch's rounding, or not verified batched;
  and for any method under a noise tunnel, which interleaves its samples, and for custom
  wrappers, whose score functions cannot be split by rows).

The wrapped forward pass checks the row count it sees against its layout and raises
:class:`BatchLayoutError` when the layout does not allow it (a method that expands the batch
differently from its declaration): wrong masks are never used silently. A test checks that
every declared method gives on a batch what it gives input by input.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esegeta.attribution import wrappers
from esegeta.spec import registry
from esegeta.spec.registry import PER_INPUT, ROWS, TILE
from esegeta.spec.request import Request, WrapperConfig


class BatchLayoutError(RuntimeError):
    """Internal error: a method fed the batched wrapped view a row count its declared layout
    does not allow (its ``batch_layout`` in its adapter's table is wrong)."""


def layout(request: Request, batch: int) -> str:
    """How ``request`` explains ``batch`` wrapped inputs: ``"rows"``, ``"tile"`` or ``"per_input"``."""
    wrapper = request.wrapper
    if wrapper is None or batch < 2 or request.noise_tunnel is not None or wrapper.name not in wrappers.BUILTIN:
        return PER_INPUT
    return request.spec.batch_layout


def inputs_of_rows(kind: str, rows: int, inputs: int, method: str = "") -> int:
    """How many copies ``k`` of the batch ``rows`` forward rows are under ``kind``
    (:class:`BatchLayoutError` when ``kind`` does not allow ``rows``)."""
    allowed = rows == inputs if kind == ROWS else kind == TILE and rows > 0 and rows % inputs == 0
    if not allowed:
        what = {ROWS: f"exactly {inputs}", TILE: f"a multiple of {inputs}"}.get(kind, "none")
        raise BatchLayoutError(f"internal error: {method or 'the method'} passed {rows} rows to the batched wrapped "
                               f"model of {inputs} inputs; its layout {kind!r} allows {what}. Its batch_layout in "
                               f"{_table(method)} is wrong: state {PER_INPUT!r} there (the method then runs one "
                               "input per call)")
    return rows // inputs


def _table(method: str) -> str:
    """Where ``method``'s facts are stated: its adapter module's table."""
    spec = registry.all_methods().get(method)
    return f"its adapter's table ({type(spec.adapter).__module__})" if spec is not None else "its adapter's table"


class BatchedScore(nn.Module):
    """The scores of ``B`` inputs' wrappers (built-in: :class:`esegeta.attribution.wrappers.MaskedScore`)
    on ``N`` rows: row ``r`` scored with the masks of its input under ``kind``.

    ``masks`` is ``(B, K', *spatial)``: input ``i``'s frozen masks are ``masks[i]``."""

    def __init__(self, scores: Sequence[wrappers.MaskedScore], kind: str, method: str = ""):
        super().__init__()
        first = scores[0]
        for score in scores[1:]:
            # one wrapper config on one model: the channels are the same list (compared by shape: meta tensors have no values)
            if score.channels.shape != first.channels.shape or score.reduction != first.reduction:
                raise ValueError("the inputs' wrappers differ in channels or reduction; explain them one at a time")
        self.activation = first.activation
        self.register_buffer("channels", first.channels)
        self.register_buffer("masks", torch.cat([s.masks for s in scores]))
        self.reduction = first.reduction
        self.output_key = first.output_key
        self.kind = kind
        self.method = method

    def forward(self, output: Any) -> torch.Tensor:
        picked = self.activation(wrappers.select_output(output, self.output_key)).index_select(1, self.channels)
        n, b = picked.shape[0], self.masks.shape[0]
        k = inputs_of_rows(self.kind, n, b, self.method)
        # (k, B, K', *spatial) · (B, K', *spatial): each row with its own input's masks, no copy of them
        weighted = picked.reshape(k, b, *picked.shape[1:]) * self.masks
        spatial = tuple(range(3, weighted.ndim))
        score = weighted.sum(dim=spatial)
        if self.reduction == "mean":
            score = score / self.masks.sum(dim=tuple(range(2, self.masks.ndim))).clamp_min(1.0)
        return score.reshape(n, -1)


def build(model: nn.Module, x: torch.Tensor, wrapper: WrapperConfig, base_dir: Path | None, kind: str,
          method: str = "") -> wrappers.WrappedModel:
    """The batched wrapped view of ``model`` for the inputs ``x``: each input's wrapper built as
    for a call of its own (the same frozen masks and unperturbed scores), joined under ``kind``."""
    single = [wrappers.build(model, x[i:i + 1], wrapper, base_dir) for i in range(x.shape[0])]
    scores = [w.score for w in single]
    if not all(isinstance(s, wrappers.MaskedScore) for s in scores):
        raise ValueError("only built-in wrappers' scores can be batched")
    unperturbed = torch.cat([w.unperturbed for w in single])
    return wrappers.WrappedModel(model, BatchedScore(scores, kind, method), unperturbed)
