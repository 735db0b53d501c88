"""Randomisation metrics: does the explanation depend on what the model learned?

Each metric re-explains with the context's ``explain(model, x, target)`` on randomised copies of
the context's model (the model itself is never touched). A layer is any module with
``reset_parameters`` (convolutions, linear and normalisation layers); it is randomised by its own
``reset_parameters`` right after seeding torch with ``seed + 1``, as Quantus does, inside
``torch.random.fork_rng`` so the caller's random state is left as it was. Explanations are
computed for the whole batch at once, in chunks of at most ``max_batch`` inputs. ``similarity``
is ``spearman`` (rank correlation of the flattened maps, ties averaged), ``pearson``, ``cosine``
or ``ssim`` (structural similarity of the channel-summed maps, as scikit-image computes it).
"""
from __future__ import annotations

import dataclasses

import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from esegeta.errors import ConfigError
from esegeta.evaluation.base import Context, MetricResult, MetricSpec, Rule, keyword_defaults, register
from esegeta.evaluation.similarity import SIMILARITIES, similarity

ORDERS = ("top_down", "bottom_up", "independent")
#: What the randomisation metrics' parameters accept (checked with the config, before a run).
RULES = {"order": Rule("str", choices=ORDERS), "seed": Rule("int"), "similarity": Rule("str", choices=SIMILARITIES),
         "abs": Rule("bool"), "aggregate": Rule("str", choices=("last", "mean")), "nr_samples": Rule("int", 1),
         "noise_magnitude": Rule("float", 0), "n_bins": Rule("int", 1), "num_classes": Rule("int", 2, optional=True)}


def randomisable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's modules that have ``reset_parameters``, in definition order."""
    return [(name, module) for name, module in model.named_modules() if hasattr(module, "reset_parameters")]


def _reset(module: nn.Module, seed: int) -> None:
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 1)
        module.reset_parameters()


def randomised_models(model: nn.Module, order: str = "top_down", seed: int = 42,
                      randomised: nn.Module | None = None) -> Iterator[tuple[str, nn.Module]]:
    """Yield (layer name, model copy) with one more layer randomised each time (``top_down``: from the
    output, cascading; ``bottom_up``: from the input, cascading; ``independent``: only that layer).
    One copy (``randomised``, a copy of ``model`` made once, or a deep copy) is changed in place
    between yields: nothing is copied or prepared per layer."""
    if order not in ORDERS:
        raise ConfigError("params.order", f"unknown order {order!r}; valid: {', '.join(ORDERS)}")
    randomised = copy.deepcopy(model) if randomised is None else randomised
    original = copy.deepcopy(randomised.state_dict()) if order == "independent" else None
    layers = randomisable_layers(randomised)
    if not layers:
        raise ConfigError("evaluation.metrics", "the model has no layer with reset_parameters to randomise")
    if order == "top_down":
        layers = layers[::-1]
    for name, module in layers:
        if original is not None:
            randomised.load_state_dict(original)
        _reset(module, seed)
        yield name, randomised


def fully_randomised(model: nn.Module, seed: int = 42, randomised: nn.Module | None = None) -> nn.Module:
    """A copy of ``model`` (``randomised``, or a deep copy) with every layer randomised (the last
    model of a cascade, in any order)."""
    randomised = copy.deepcopy(model) if randomised is None else randomised
    for _, module in randomisable_layers(randomised):
        _reset(module, seed)
    return randomised


def explain_batched(ctx: Context, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """``ctx.explain`` over ``x`` in chunks of at most ``max_batch`` inputs, on ``x``'s device."""
    parts = [ctx.explain(model, xs, ts) for xs, ts in zip(x.split(ctx.max_batch), target.split(ctx.max_batch))]
    return torch.cat([p.to(x.device) for p in parts])


def smooth_explain(ctx: Context, model: nn.Module, x: Tensor, target: Tensor, nr_samples: int,
                   noise_magnitude: float, noise: Tensor | None = None) -> Tensor:
    """Mean of explanations of ``nr_samples`` noisy copies of ``x`` (the last copy noise-free), the
    noise N(0, (noise_magnitude · (max - min))²) per input, as SmoothMPRT; all copies explained in
    chunks of at most ``max_batch``. ``noise`` (B, nr_samples - 1, C, *S) may be given."""
    if nr_samples <= 1:
        return explain_batched(ctx, model, x, target)
    b = x.shape[0]
    flat = x.reshape(b, -1)
    std = noise_magnitude * (flat.max(1).values - flat.min(1).values)
    if noise is None:
        noise = ctx.randn((b, nr_samples - 1, *x.shape[1:]), x.device, x.dtype)
        noise = noise * std.reshape((b, 1) + (1,) * (x.dim() - 1))
    noisy = torch.cat([x[:, None] + noise, x[:, None]], dim=1).reshape(b * nr_samples, *x.shape[1:])
    a = explain_batched(ctx, model, noisy, target.repeat_interleave(nr_samples))
    return a.reshape(b, nr_samples, *a.shape[1:]).mean(1)


def comparable(reference: Tensor, a: Tensor) -> Tensor:
    """The re-explanation ``a`` in the form of the saved ``reference`` (a one-channel map broadcast
    to its channels), or esegeta's error naming the mismatch and the fix."""
    if a.shape == reference.shape:
        return a
    if a.shape[1] == 1 and a.shape[0] == reference.shape[0]:
        return a.expand_as(reference)
    raise ConfigError("attribution", f"the attribution has {reference.shape[1]} channel(s), the method's "
                                     f"re-explanation {a.shape[1]}: give the attribution as the method returns it "
                                     f"({a.shape[1]} channel(s), e.g. from esegeta.explain), or a one-channel map "
                                     "of a method that returns one")


def _layer_similarities(ctx, x, attribution, target, order, seed, abs, kind, explain) -> tuple[Tensor, list[str]]:
    reference = attribution.abs() if abs else attribution
    values, names = [], []
    for name, randomised in randomised_models(ctx.model, order, seed, ctx.copy(ctx.model, x)):
        a = explain(randomised)
        a = a.abs() if abs else a
        values.append(similarity(reference, comparable(reference, a), kind))
        names.append(name)
    return torch.stack(values, 1), names


def _aggregate(curve: Tensor, aggregate: str) -> Tensor:
    if aggregate == "last":
        return curve[:, -1]
    if aggregate == "mean":
        return curve.mean(1)
    raise ConfigError("params.aggregate", f"unknown aggregate {aggregate!r}; valid: last, mean")


def mprt(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, order: str = "top_down", seed: int = 42,
         similarity: str = "spearman", abs: bool = True, aggregate: str = "last") -> MetricResult:
    """Model-parameter randomisation test (Adebayo et al. 2018): the similarity (Spearman rank
    correlation of |attribution| by default) between the attribution and the explanation of the model
    with its layers randomised one after another (``top_down``: cascading from the output;
    ``independent``: one layer at a time). The curve holds one similarity per layer; the value is the
    last (fully randomised in a cascade) or the mean (lower is better: the explanation follows the weights)."""
    curve, _ = _layer_similarities(ctx, x, attribution, target, order, seed, abs, similarity,
                                   lambda model: explain_batched(ctx, model, x, target))
    return MetricResult(_aggregate(curve, aggregate), {"similarity": curve})


def smooth_mprt(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, order: str = "bottom_up",
                seed: int = 42, nr_samples: int = 50, noise_magnitude: float = 0.1, similarity: str = "spearman",
                abs: bool = True, aggregate: str = "last") -> MetricResult:
    """Smooth MPRT (Hedström et al. 2023, Sanity Checks Revisited): MPRT with each randomised model's
    explanation averaged over ``nr_samples`` noisy copies of the input (noise std ``noise_magnitude``
    times the input's range), which removes the noise that makes plain MPRT unreliable (lower is better)."""
    curve, _ = _layer_similarities(
        ctx, x, attribution, target, order, seed, abs, similarity,
        lambda model: smooth_explain(ctx, model, x, target, nr_samples, noise_magnitude))
    return MetricResult(_aggregate(curve, aggregate), {"similarity": curve})


def histogram_entropy(a: Tensor, n_bins: int = 100) -> Tensor:
    """(B,) Shannon entropy (nats) of the histogram of each row's values over ``n_bins`` equal bins
    between the row's minimum and maximum (``scipy.stats.entropy(np.histogram(a, n_bins)[0])``)."""
    flat = a.reshape(a.shape[0], -1).to(torch.float64 if a.device.type != "mps" else a.dtype)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    width = torch.where(high > low, high - low, torch.ones_like(high))
    index = ((flat - low) / width * n_bins).floor().clamp(0, n_bins - 1).to(torch.long)
    counts = torch.zeros(flat.shape[0], n_bins, device=a.device, dtype=flat.dtype).scatter_add_(1, index, torch.ones_like(flat))
    p = counts / counts.sum(1, keepdim=True)
    return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(1).to(a.dtype)


def efficient_mprt(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, seed: int = 42,
                   n_bins: int = 100, abs: bool = False) -> MetricResult:
    """Efficient MPRT (Hedström et al. 2023, Sanity Checks Revisited): the relative rise in the
    complexity (histogram entropy over ``n_bins`` bins) of the explanation when every layer is
    randomised, (H(random) - H(original)) / H(original); one re-explanation per input (higher is better)."""
    reference = attribution.abs() if abs else attribution
    randomised = explain_batched(ctx, fully_randomised(ctx.model, seed, ctx.copy(ctx.model, x)), x, target)
    randomised = randomised.abs() if abs else randomised
    before, after = histogram_entropy(reference, n_bins), histogram_entropy(randomised, n_bins)
    return MetricResult((after - before) / before, {"entropy": torch.stack([before, after], 1)})


def off_targets(ctx: Context, target: Tensor, num_classes: int) -> Tensor:
    """A class other than the target for each input, uniformly drawn from the context's generator."""
    draw = ctx.randint(num_classes - 1, target.shape, target.device)
    return draw + (draw >= target).to(draw.dtype)


def random_logit(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, num_classes: int | None = None,
                 similarity: str = "spearman", abs: bool = False) -> MetricResult:
    """Random logit (Sixt et al. 2020): the similarity between the attribution and the explanation of
    a randomly chosen other class (``num_classes`` defaults to the number of scores the forward
    returns) (lower is better: the explanation is class-specific)."""
    if num_classes is None:  # the unperturbed input's scores, computed once per evaluation
        num_classes = int(ctx.reference_scores(x[:1]).shape[1])
    if num_classes < 2:
        raise ConfigError("params.num_classes", f"random logit needs at least 2 classes, got {num_classes}")
    return random_logit_for(ctx, x, attribution, target, off_targets(ctx, target, num_classes), similarity, abs)


def random_logit_for(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, other: Tensor,
                     kind: str = "spearman", abs: bool = False) -> MetricResult:
    """Random logit against the given other classes ``other`` (B,)."""
    a = explain_batched(ctx, ctx.model, x, other)
    reference = attribution.abs() if abs else attribution
    a = a.abs() if abs else a
    return MetricResult(similarity(reference, comparable(reference, a), kind))


for _spec in (
    MetricSpec("mprt", "randomisation", "Adebayo et al. 2018, Sanity Checks for Saliency Maps (NeurIPS)", mprt,
               keyword_defaults(mprt), higher_is_better=False, needs={"model", "explain"},
               explanations=lambda p, layers: layers,
               summary="similarity to explanations of a model with randomised layers (one re-explanation per layer)"),
    MetricSpec("smooth_mprt", "randomisation", "Hedström et al. 2023, Sanity Checks Revisited: An Exploration to "
               "Repair the Model Parameter Randomisation Test (XAI in Action workshop, NeurIPS)", smooth_mprt,
               keyword_defaults(smooth_mprt), higher_is_better=False, needs={"model", "explain"},
               explanations=lambda p, layers: layers * max(1, int(p["nr_samples"])),
               summary="MPRT with noise-averaged explanations (nr_samples re-explanations per layer)"),
    MetricSpec("efficient_mprt", "randomisation", "Hedström et al. 2023, Sanity Checks Revisited: An Exploration to "
               "Repair the Model Parameter Randomisation Test (XAI in Action workshop, NeurIPS)", efficient_mprt,
               keyword_defaults(efficient_mprt), higher_is_better=True, needs={"model", "explain"},
               explanations=lambda p, layers: 1,
               summary="relative rise of explanation entropy once all layers are randomised (one re-explanation)"),
    MetricSpec("random_logit", "randomisation", "Sixt, Granz, Landgraf 2020, When Explanations Lie: Why Many "
               "Modified BP Attributions Fail (ICML)", random_logit, keyword_defaults(random_logit),
               higher_is_better=False, needs={"model", "explain"}, explanations=lambda p, layers: 1,
               passes=lambda p, s: 1 if p["num_classes"] is None else 0,
               summary="similarity to the explanation of a random other class (one re-explanation)"),
):
    register(dataclasses.replace(_spec, rules=RULES))
