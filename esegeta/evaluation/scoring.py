"""What a metric perturbs and re-explains on the user's own model.

- :func:`scorer`: the forward a metric calls, ``(N, C, *S) -> (N, K)`` scores, for one
  unperturbed input ``x`` (batch of one) of a request. Without a wrapper it is the prepared
  model. With a wrapper, the masks are frozen once on the unperturbed input (as the
  attribution froze them) and every perturbed input goes through that same wrapped score:
  the metric watches the value that was explained, never masks recomputed on a perturbed
  input. With a patch (either mode) the prediction is the stitched whole-input one of
  :class:`esegeta.attribution.patcher.Stitched`, computed ``patch.batch_size`` patches at a time, so the
  memory of a forward is that of the attribution's own global mode times the metric's
  ``max_batch``. Everything runs under ``torch.no_grad``.
- :func:`explainer`: the ``explain(model, x, target)`` callable of the randomisation and
  robustness metrics: the request's esegeta method (:func:`esegeta.attribution.explainer.run`, the same
  method, parameters, layer, wrapper and patch) on a prepared copy of ``model``, in fp32,
  seeded. A wrapped request (without patch) reuses the frozen score of the unperturbed input
  and original model, so a randomised model or a noisy input is explained for the same region.
- :func:`as_input_attribution`: a saved result as a metric takes it: layer-resolution maps
  (Grad-CAM) interpolated to the input's grid, a layer's channels summed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from esegeta.attribution import numerics, scheduling, wrappers
from esegeta.attribution.call import resolve_target
from esegeta.attribution.prepare import prepare, prepared
from esegeta.errors import ConfigError
from esegeta.spec.request import Request
from esegeta.spec.targets import Target
from esegeta.attribution.patcher import Grid, Stitched
from esegeta.attribution.explainer import run


@dataclass
class Scorer:
    """The scored view of one input: ``module`` maps a batch to (N, K) scores; ``mask`` is the
    wrapper's frozen masks (K', *S) where the wrapper has some; ``stitched`` tells a patched one."""
    module: nn.Module
    masks: torch.Tensor | None
    stitched: bool

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scores = self.module(z)
        if not torch.is_tensor(scores) or scores.ndim != 2:
            shape = tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__
            raise ValueError(f"the model's output has shape {shape}, not (batch, classes): a segmentation model "
                             "needs a wrapper")
        return scores.float()

    @property
    def score(self) -> nn.Module | None:
        """The frozen score function (output -> (N, K')), or None without a wrapper."""
        return getattr(self.module, "score", None)

    def target_mask(self, target: int) -> torch.Tensor | None:
        """The frozen mask of column ``target`` as (1, 1, *S) bool, or None (no built-in wrapper)."""
        if self.masks is None:
            return None
        return (self.masks[target] > 0)[None, None]


def scorer(request: Request, model: nn.Module, x: torch.Tensor, base_dir: Path | None = None,
           fast: nn.Module | None = None) -> Scorer:
    """The forward of ``request``'s evaluation on the unperturbed input ``x`` (one input if the
    request has a wrapper); ``model`` is the user's model or its prepared copy; ``fast`` the
    evaluation's :func:`esegeta.evaluation.base.inference_copy` of it, which scores a request
    without wrapper and patch where given."""
    if fast is not None and request.wrapper is None and request.patch is None:
        return Scorer(fast, None, False)
    ready = prepared(model, x if request.patch is None else _crop(x, request.patch.size))
    if request.wrapper is None:
        return Scorer(ready, None, False)
    if x.shape[0] != 1:
        raise ValueError("a wrapped segmenter is scored one input at a time (its masks are that input's)")
    if request.patch is None:
        wrapped = wrappers.build(ready, x, request.wrapper, base_dir)
        return Scorer(wrapped, _masks(wrapped.score), False)
    patch = request.patch
    grid = Grid.over(tuple(x.shape[2:]), list(patch.size), patch.overlap, patch.blend)
    stitched = Stitched(ready, grid, x.ndim - 2, patch.batch_size, request.wrapper.output)
    with torch.no_grad():
        wrapped = Stitched.build_wrapper(stitched, x, request.wrapper, base_dir)
    return Scorer(wrapped, _masks(wrapped.score), True)


def _crop(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    return x[(slice(None), slice(None)) + tuple(slice(0, s) for s in size)]


def _masks(score: nn.Module) -> torch.Tensor | None:
    masks = getattr(score, "masks", None)
    return masks[0] if torch.is_tensor(masks) else None


def target_of(request: Request, forward: Scorer, x: torch.Tensor,
              scores: Callable[[torch.Tensor], torch.Tensor] | None = None, given: int | None = None,
              name: str | None = None) -> torch.Tensor:
    """The explained column of each input of ``x`` (``"predicted"`` → argmax of the scores), (B,) long;
    ``scores`` computes them where not ``forward`` (the engine's shared passes), and then checks a
    class index against their width; ``given`` is the class of input ``name`` in place of the
    request's target (the Python API's per-input targets)."""
    wanted = request.target if given is None else given
    if wanted is None:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    if wanted == "predicted":
        return (scores or forward)(x).argmax(dim=1)
    if scores is None:
        resolve_target(forward.module, x, wanted, "target", check=True)
    elif not 0 <= int(wanted) < (width := scores(x).shape[1]):
        raise ConfigError("target", f"target {wanted}{f' of {name}' if name else ''} does not exist: the "
                                    f"{'wrapped' if request.wrapper is not None else 'model'} output has {width} columns")
    return torch.full((x.shape[0],), int(wanted), dtype=torch.long, device=x.device)


def as_input_attribution(attribution: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``attribution`` (B, c, *s) as (B, C|1, *S) on ``x``'s grid: a layer's channels summed,
    a coarser map interpolated (bilinear / trilinear, as Captum's ``LayerAttribution.interpolate``)."""
    a = attribution.to(device=x.device, dtype=torch.float32)
    if a.ndim == x.ndim - 1:  # (B, *S) without a channel axis
        a = a.unsqueeze(1)
    if a.ndim != x.ndim:
        raise ValueError(f"an attribution of shape {tuple(attribution.shape)} cannot score inputs {tuple(x.shape)}")
    if a.shape[1] not in (1, x.shape[1]):
        a = a.sum(dim=1, keepdim=True)
    if tuple(a.shape[2:]) != tuple(x.shape[2:]):
        mode = "bilinear" if x.ndim == 4 else "trilinear"
        a = F.interpolate(a, size=tuple(x.shape[2:]), mode=mode, align_corners=False)
    return a


class Explainer:
    """``explain(model, x, target) -> (N, C|1, *S)``: ``request``'s method on ``model`` for the
    columns ``target`` (N,), as the run computed it (see the module docstring).

    :meth:`copy` gives a prepared copy of a model that ``explain`` takes as it is: the
    randomisation metrics randomise that one copy in place, layer after layer, so no
    re-explanation prepares a model again (a changed model would be re-prepared: a deep copy and
    a forward each time). Inputs explained for different classes go through one call, each row with
    its own class, where the request has no wrapper or patch (else one call per class)."""

    def __init__(self, request: Request, forward: Scorer | None = None, base_dir: Path | None = None, seed: int = 0):
        self.request, self.base_dir, self.seed = request, base_dir, seed
        self.frozen = forward.score if forward is not None and request.wrapper is not None \
            and request.patch is None else None

    def _example(self, x: torch.Tensor) -> torch.Tensor:
        return x[:1] if self.request.patch is None else _crop(x[:1], self.request.patch.size)

    def copy(self, model: nn.Module, x: torch.Tensor) -> nn.Module:
        """A fresh prepared copy of ``model`` for inputs like ``x`` (the user's model is untouched)."""
        return prepare(model, self._example(x))

    def _same_region(self, model: nn.Module, piece: torch.Tensor, wrapper, base: Path | None) -> nn.Module:
        return wrappers.WrappedModel(model, self.frozen)

    def __call__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = torch.as_tensor(target).reshape(-1).expand(x.shape[0]).tolist()
        ready = prepared(model, self._example(x))
        kw = {"build_wrapper": self._same_region} if self.frozen is not None else {}
        if self.frozen is None and self.request.patch is None and len(set(target)) > 1:
            # one call for the batch, each row its own class (random logit's other classes)
            resolved = Target(torch.tensor(target, device=x.device), len(target))
            with numerics.fp32_numerics(), scheduling.JobRandomness(self.seed, self.request.spec.uses_global_rng):
                result = run(self.request.replace(target=resolved), ready, x.detach(), base_dir=self.base_dir,
                             samples=x.detach()).result
            return as_input_attribution(result, x)
        out: list[torch.Tensor | None] = [None] * x.shape[0]
        for t in sorted(set(target)):
            rows = [i for i, v in enumerate(target) if v == t]
            piece = x[rows].detach()
            with numerics.fp32_numerics(), scheduling.JobRandomness(self.seed, self.request.spec.uses_global_rng):
                result = run(self.request.replace(target=int(t)), ready, piece, base_dir=self.base_dir,
                             samples=piece, **kw).result
            for n, i in enumerate(rows):
                out[i] = result[n:n + 1]
        return as_input_attribution(torch.cat(out), x)


def explainer(request: Request, forward: Scorer | None = None, base_dir: Path | None = None,
              seed: int = 0) -> Explainer:
    """The :class:`Explainer` of ``request`` (a wrapped request keeps ``forward``'s frozen score)."""
    return Explainer(request, forward, base_dir, seed)


__all__ = ["Explainer", "Scorer", "as_input_attribution", "explainer", "scorer", "target_of"]
