"""Faithfulness metrics: does removing what the attribution calls relevant change the score?

Features are spatial positions (all channels of a pixel or voxel together) or, with
``patch_size > 1``, non-overlapping patches on a grid centred on the input (the border patches
may be partial, as in Quantus); a
feature's relevance is the attribution summed over its channels and voxels. Every perturbed
input of every step and every input of the batch is built on the device from one rank map and
sent through :meth:`Context.scores` in chunks of at most ``max_batch`` inputs.

Baselines (what a removed feature becomes): ``"value"`` (the constant ``value``), ``"min"``
and ``"max"`` (the input's smallest/largest value, Quantus's "black"/"white"), ``"mean"`` (the
input's mean), ``"blur"`` (the input blurred by a Gaussian of ``blur_sigma`` voxels), ``"uniform"``
(noise drawn once per input, uniform between the input's minimum and maximum).
"""
from __future__ import annotations

import dataclasses

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from esegeta.errors import ConfigError
from esegeta.evaluation.base import Context, MetricResult, MetricSpec, Rule, keyword_defaults, register
from esegeta.evaluation.similarity import pearson

BASELINES = ("value", "min", "max", "mean", "blur", "uniform")
ORDERS = ("morf", "lerf", "random")
#: What the faithfulness metrics' parameters accept (checked with the config, before a run).
RULES = {"steps": Rule("int", 1), "baseline": Rule("str", choices=BASELINES), "value": Rule("float"),
         "blur_sigma": Rule("float", 0, open_low=True), "softmax": Rule("bool"), "order": Rule("str", choices=ORDERS),
         "features_in_step": Rule("int", 1), "patch_size": Rule("int", 1), "regions_evaluation": Rule("int", 1),
         "nr_runs": Rule("int", 2), "subset_size": Rule("int", 1, optional=True), "n_perturbations": Rule("int", 1),
         "perturbation": Rule("str", choices=("noise", "patches")), "noise_std": Rule("float", 0),
         "normalize": Rule("bool")}


# --------------------------------------------------------------------------- helpers
def spatial_numel(x: Tensor) -> int:
    return math.prod(x.shape[2:])


#: The longest axis :func:`gaussian_blur` blurs by a matrix product (its band matrix is L²; longer
#: axes are convolved, where the product's L multiplications per value would cost more).
BAND_LENGTH = 2048


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """``x`` (B, C, *S) blurred by a separable Gaussian of ``sigma`` voxels (edges replicated): along
    each axis one matrix product with the (L, L) band matrix of the kernel, the replicated edges
    folded into its first and last columns (4-9x faster than one-channel convolutions on the CPU,
    up to 1024 long), or a convolution along axes longer than :data:`BAND_LENGTH`."""
    if sigma <= 0:
        return x.clone()
    radius = max(1, int(math.ceil(3 * sigma)))
    grid = torch.arange(-radius, radius + 1, device=x.device)
    kernel = torch.exp(-(grid.to(x.dtype) ** 2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = x
    for axis in range(2, x.dim()):
        length = x.shape[axis]
        if length > BAND_LENGTH:
            out = _convolve_axis(out, kernel, axis, radius)
            continue
        rows = torch.arange(length, device=x.device)[:, None].expand(-1, grid.numel())
        band = torch.zeros(length, length, device=x.device, dtype=x.dtype)
        band.index_put_((rows, (rows + grid).clamp(0, length - 1)), kernel.expand(length, -1), accumulate=True)
        out = (out.movedim(axis, -1) @ band.T).movedim(-1, axis)
    return out.contiguous()


def _convolve_axis(x: Tensor, kernel: Tensor, axis: int, radius: int) -> Tensor:
    """``x`` (B, C, *S) convolved with the 1-d ``kernel`` along ``axis``, edges replicated."""
    dims = x.dim() - 2
    conv = (F.conv2d, F.conv3d)[dims - 2]
    shape = [1, 1] + [1] * dims
    shape[axis] = kernel.numel()
    pad = [0, 0] * dims
    pad[2 * (x.dim() - 1 - axis)] = pad[2 * (x.dim() - 1 - axis) + 1] = radius
    flat = x.reshape(x.shape[0] * x.shape[1], 1, *x.shape[2:])
    return conv(F.pad(flat, pad, mode="replicate"), kernel.reshape(shape)).reshape(x.shape)


def make_baseline(ctx: Context, x: Tensor, baseline: str, value: float = 0.0, blur_sigma: float = 2.0) -> Tensor:
    """The (B, C, *S) tensor a removed feature is replaced by (see the module docstring)."""
    flat = x.reshape(x.shape[0], -1)
    view = (-1,) + (1,) * (x.dim() - 1)
    if baseline == "value":
        return torch.full_like(x, float(value))
    if baseline == "min":
        return flat.min(1).values.reshape(view).expand_as(x)
    if baseline == "max":
        return flat.max(1).values.reshape(view).expand_as(x)
    if baseline == "mean":
        return flat.mean(1).reshape(view).expand_as(x)
    if baseline == "blur":
        return gaussian_blur(x, blur_sigma)
    if baseline == "uniform":
        low, high = flat.min(1).values.reshape(view), flat.max(1).values.reshape(view)
        return low + (high - low) * ctx.rand(x.shape, x.device, x.dtype)
    raise ConfigError("params.baseline", f"unknown baseline {baseline!r}; valid: {', '.join(BASELINES)}")


def patch_padding(spatial, patch_size: int) -> list[tuple[int, int]]:
    """(before, after) padding per axis that makes each axis a multiple of ``patch_size``, split
    evenly (the patch grid is centred, as Quantus's ``get_padding_size``)."""
    return [((-s) % patch_size // 2, (-s) % patch_size - (-s) % patch_size // 2) for s in spatial]


def feature_relevance(attribution: Tensor, patch_size: int = 1) -> tuple[Tensor, tuple[int, ...]]:
    """(B, F) relevance per feature (channel-summed, patch-summed) and the feature grid's shape.
    Patches tile the input on a centred grid; border patches may be partial."""
    a = attribution.sum(1, keepdim=True)
    spatial = a.shape[2:]
    if patch_size <= 1:
        return a.reshape(a.shape[0], -1), tuple(spatial)
    pad = []
    for before, after in reversed(patch_padding(spatial, patch_size)):
        pad += [before, after]
    a = F.pad(a, pad)
    grid = tuple(s // patch_size for s in a.shape[2:])
    shape = [a.shape[0]]
    for g in grid:
        shape += [g, patch_size]
    a = a.reshape(shape)
    a = a.sum(dim=tuple(range(2, 2 * len(grid) + 1, 2)))
    return a.reshape(a.shape[0], -1), grid


def expand_patches(grid_values: Tensor, patch_size: int, spatial) -> Tensor:
    """(B, 1, *grid) values per patch spread over the voxels of (B, 1, *spatial) (centred grid)."""
    for axis in range(grid_values.dim() - 2):
        grid_values = grid_values.repeat_interleave(patch_size, dim=2 + axis)
    crop = tuple(slice(before, before + s) for (before, _), s in zip(patch_padding(spatial, patch_size), spatial))
    return grid_values[(slice(None), slice(None)) + crop]


def rank_map(ctx: Context, attribution: Tensor, order: str = "morf", patch_size: int = 1) -> tuple[Tensor, int]:
    """(B, 1, *S) rank of each voxel's feature (0 = removed first) and the number of features."""
    relevance, grid = feature_relevance(attribution, patch_size)
    b, n = relevance.shape
    if order == "morf":
        perm = torch.argsort(relevance, dim=1, descending=True, stable=True)
    elif order == "lerf":
        perm = torch.argsort(relevance, dim=1, stable=True)
    elif order == "random":
        perm = torch.argsort(ctx.rand((b, n), relevance.device), dim=1)
    else:
        raise ConfigError("params.order", f"unknown order {order!r}; valid: {', '.join(ORDERS)}")
    ranks = torch.empty_like(perm)
    ranks.scatter_(1, perm, torch.arange(n, device=perm.device).expand(b, n))
    ranks = ranks.reshape(b, 1, *grid)
    if patch_size > 1:
        ranks = expand_patches(ranks, patch_size, attribution.shape[2:])
    return ranks, n


def scores_of(ctx: Context, x: Tensor, target: Tensor, softmax: bool) -> Tensor:
    """(N,) score of ``target`` for each input of ``x`` (softmax over the scores first if asked)."""
    scores = ctx.scores(x)
    if softmax:
        scores = scores.softmax(dim=1)
    return scores.gather(1, target.reshape(-1, 1)).squeeze(1)


def reference_scores_of(ctx: Context, x: Tensor, target: Tensor, softmax: bool) -> Tensor:
    """:func:`scores_of` for inputs other metrics score too (the unperturbed input, the baseline):
    through :meth:`Context.reference_scores`, one pass per distinct input and evaluation."""
    scores = ctx.reference_scores(x)
    if softmax:
        scores = scores.softmax(dim=1)
    return scores.gather(1, target.reshape(-1, 1)).squeeze(1)


def perturbation_curve(ctx: Context, x: Tensor, ranks: Tensor, thresholds: Tensor, baseline: Tensor,
                       target: Tensor, softmax: bool = False, insert: bool = False,
                       features: int | None = None) -> Tensor:
    """(B, T) scores: at step t the voxels with rank < ``thresholds[t]`` are replaced by the baseline
    (deletion) or, with ``insert``, are the input's and all others the baseline's. The B·T perturbed
    inputs are built chunk by chunk (:meth:`Context.batch` at once) on the input's device. Steps that
    leave the input as it is or replace all of its ``features`` (when given) are the unperturbed input or
    the baseline: their scores are shared with other metrics (:func:`reference_scores_of`)."""
    b = x.shape[0]
    out = torch.empty(b, thresholds.numel(), device=x.device, dtype=x.dtype)
    levels = thresholds.tolist() if x.device.type != "meta" else [None] * thresholds.numel()
    whole = [t for t, v in enumerate(levels) if v is not None and features is not None and v >= features]
    none = [t for t, v in enumerate(levels) if v is not None and v <= 0]
    for steps, same in ((none, baseline if insert else x), (whole, x if insert else baseline)):
        if steps:
            out[:, steps] = reference_scores_of(ctx, same, target, softmax)[:, None]
    steps = torch.tensor([t for t in range(len(levels)) if t not in whole and t not in none], device=x.device,
                         dtype=torch.long)
    rows = b * steps.numel()
    view = (-1,) + (1,) * (x.dim() - 1)
    chunk = ctx.batch(x)
    for start in range(0, rows, chunk):
        idx = torch.arange(start, min(start + chunk, rows), device=x.device)
        bi, ti = idx // steps.numel(), steps[idx % steps.numel()]
        removed = ranks[bi] < thresholds[ti].reshape(view)
        if insert:
            removed = ~removed
        xs = torch.where(removed, baseline[bi], x[bi])
        out[bi, ti] = scores_of(ctx, xs, target[bi], softmax)
    return out


def normalised_auc(curve: Tensor) -> Tensor:
    """Trapezoid area under (B, T+1) curves sampled evenly on [0, 1]."""
    steps = curve.shape[1] - 1
    if steps < 1:
        return curve[:, 0]
    return (curve.sum(1) - 0.5 * (curve[:, 0] + curve[:, -1])) / steps


def trapezoid(curve: Tensor) -> Tensor:
    """Trapezoid area under (B, T) curves with unit spacing (``np.trapz(curve, dx=1)``)."""
    if curve.shape[1] < 2:
        return torch.zeros_like(curve[:, 0])
    return curve.sum(1) - 0.5 * (curve[:, 0] + curve[:, -1])


def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"params.{name}", f"must be an integer >= {low}, got {value!r}")
    return value


def _n_features(shape: tuple[int, ...], patch_size: int) -> int:
    return math.prod(math.ceil(s / patch_size) for s in shape[1:])


# --------------------------------------------------------------------------- deletion / insertion
def _deletion_curve(ctx, x, attribution, target, steps, baseline, value, blur_sigma, softmax, order, insert):
    steps = _check_int("steps", steps)
    ranks, n = rank_map(ctx, attribution, order)
    thresholds = (2 * n * torch.arange(steps + 1, device=x.device) + steps) // (2 * steps)  # round(k n / steps), in integers
    base = make_baseline(ctx, x, baseline, value, blur_sigma)
    curve = perturbation_curve(ctx, x, ranks, thresholds, base, target, softmax, insert=insert, features=n)
    return MetricResult(normalised_auc(curve), {"score": curve, "fraction": (thresholds.to(x.dtype) / n).expand(x.shape[0], -1)})


def deletion(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, steps: int = 20, baseline: str = "value",
             value: float = 0.0, blur_sigma: float = 5.0, softmax: bool = False, order: str = "morf") -> MetricResult:
    """Deletion curve: the target score as features are replaced by the baseline, most relevant first
    (``order="lerf"``: least relevant first) in ``steps`` equal steps from none to all; the value is
    the area under the curve over the removed fraction [0, 1] (MoRF: lower is better)."""
    return _deletion_curve(ctx, x, attribution, target, steps, baseline, value, blur_sigma, softmax, order, False)


def insertion(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, steps: int = 20, baseline: str = "blur",
              value: float = 0.0, blur_sigma: float = 5.0, softmax: bool = False, order: str = "morf") -> MetricResult:
    """Insertion curve: starting from the baseline (by default the blurred input), the input's features
    are inserted most relevant first; the value is the area under the curve over the inserted
    fraction [0, 1] (MoRF: higher is better)."""
    return _deletion_curve(ctx, x, attribution, target, steps, baseline, value, blur_sigma, softmax, order, True)


def _deletion_passes(params, shape):
    return int(params["steps"]) + 1


def _higher_unless_morf(params) -> bool:
    return params["order"] != "morf"


# --------------------------------------------------------------------------- pixel flipping / region perturbation
def pixel_flipping(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, features_in_step: int = 1,
                   baseline: str = "min", value: float = 0.0, blur_sigma: float = 5.0, softmax: bool = True,
                   order: str = "morf") -> MetricResult:
    """Pixel flipping (Bach et al. 2015): ``features_in_step`` pixels (voxels) at a time, most relevant
    first, are replaced by the baseline until none is left; the curve holds the target score after
    each step (the unperturbed score is not part of it) and the value is its trapezoid area with unit
    spacing, as Quantus's ``PixelFlipping(return_auc_per_sample=True)`` (MoRF: lower is better)."""
    step = _check_int("features_in_step", features_in_step)
    ranks, n = rank_map(ctx, attribution, order)
    thresholds = torch.clamp(torch.arange(1, math.ceil(n / step) + 1, device=x.device) * step, max=n)
    base = make_baseline(ctx, x, baseline, value, blur_sigma)
    curve = perturbation_curve(ctx, x, ranks, thresholds, base, target, softmax, features=n)
    return MetricResult(trapezoid(curve), {"score": curve})


def _pixel_flipping_passes(params, shape):
    return math.ceil(math.prod(shape[1:]) / int(params["features_in_step"]))


def region_perturbation(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, patch_size: int = 8,
                        regions_evaluation: int = 100, baseline: str = "uniform", value: float = 0.0,
                        blur_sigma: float = 5.0, softmax: bool = True, order: str = "morf") -> MetricResult:
    """Region perturbation (Samek et al. 2017): non-overlapping patches of ``patch_size`` voxels per axis,
    ordered by their summed relevance, are replaced by the baseline one after another (at most
    ``regions_evaluation`` of them); the curve is the drop of the target score after each step and the
    value its mean, the AOPC (MoRF: higher is better; LeRF: lower is better)."""
    patch = _check_int("patch_size", patch_size)
    regions = _check_int("regions_evaluation", regions_evaluation)
    ranks, n = rank_map(ctx, attribution, order, patch)
    thresholds = torch.arange(1, min(regions, n) + 1, device=x.device)
    base = make_baseline(ctx, x, baseline, value, blur_sigma)
    y0 = reference_scores_of(ctx, x, target, softmax)
    curve = y0[:, None] - perturbation_curve(ctx, x, ranks, thresholds, base, target, softmax, features=n)
    return MetricResult(curve.mean(1), {"drop": curve})


def _region_passes(params, shape):
    return 1 + min(int(params["regions_evaluation"]), _n_features(shape, int(params["patch_size"])))


# --------------------------------------------------------------------------- faithfulness correlation
def random_subsets(ctx: Context, b: int, runs: int, n: int, size: int, device) -> Tensor:
    """(B, R, n) bool: for each input and run, ``size`` distinct features drawn uniformly."""
    keys = ctx.rand((b, runs, n), device)
    chosen = keys.topk(size, dim=2).indices
    return torch.zeros(b, runs, n, dtype=torch.bool, device=device).scatter_(2, chosen, True)


def subset_correlation(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, subsets: Tensor,
                       baseline: Tensor, softmax: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Faithfulness correlation for given subsets (B, R, F) of the flattened features of ``x``:
    Pearson correlation over runs of the attribution summed over the subset against the score drop
    when the subset is replaced by the baseline. Features are the elements of ``x`` (channels apart)
    when ``subsets`` has C·|S| of them, else spatial positions. Returns (values, drops, sums)."""
    b, runs, n = subsets.shape
    per_element = n == x[0].numel()
    a = attribution.expand_as(x) if per_element else attribution.sum(1, keepdim=True)
    a = a.reshape(b, -1)
    sums = (subsets * a[:, None, :]).sum(-1)
    y0 = reference_scores_of(ctx, x, target, softmax)
    drops = torch.empty(b * runs, device=x.device, dtype=x.dtype)
    chunk = ctx.batch(x)
    for start in range(0, b * runs, chunk):
        idx = torch.arange(start, min(start + chunk, b * runs), device=x.device)
        bi, ri = idx // runs, idx % runs
        m = subsets[bi, ri]
        m = m.reshape(-1, *x.shape[1:]) if per_element else m.reshape(-1, 1, *x.shape[2:])
        xs = torch.where(m, baseline[bi], x[bi])
        drops[start:start + idx.numel()] = y0[bi] - scores_of(ctx, xs, target[bi], softmax)
    drops = drops.reshape(b, runs)
    return pearson(sums, drops), drops, sums


def faithfulness_correlation(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, nr_runs: int = 100,
                             subset_size: int | None = None, baseline: str = "min", value: float = 0.0,
                             blur_sigma: float = 5.0, softmax: bool = False) -> MetricResult:
    """Faithfulness correlation (Bhatt et al. 2020): over ``nr_runs`` random subsets of
    ``subset_size`` pixels (voxels), the Pearson correlation between the attribution summed over the
    subset and the drop of the target score when the subset is replaced by the baseline; ``subset_size``
    defaults to Quantus's 224, or a quarter of the pixels (voxels) on inputs with fewer than 896 (higher is better)."""
    runs = _check_int("nr_runs", nr_runs, 2)
    n = spatial_numel(x)
    size = _check_int("subset_size", min(224, max(1, n // 4)) if subset_size is None else subset_size)
    if size > n:
        raise ConfigError("params.subset_size", f"{size} exceeds the input's {n} pixels (voxels); choose at most {n}")
    subsets = random_subsets(ctx, x.shape[0], runs, n, size, x.device)
    base = make_baseline(ctx, x, baseline, value, blur_sigma)
    values, drops, sums = subset_correlation(ctx, x, attribution, target, subsets, base, softmax)
    return MetricResult(values, {"drop": drops, "attribution_sum": sums})


# --------------------------------------------------------------------------- infidelity
def noise_infidelity(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, noise: Tensor,
                     softmax: bool = False, normalize: bool = True) -> Tensor:
    """Infidelity for given perturbations ``noise`` (B, R, C, *S): mean over R of
    (sum(a * I) - (f(x) - f(x - I)))², with Captum's ``normalize`` (attributions rescaled by the
    least-squares factor beta first)."""
    b, runs = noise.shape[:2]
    a = attribution.expand_as(x)
    dots = (noise * a[:, None]).reshape(b, runs, -1).sum(-1)
    y0 = reference_scores_of(ctx, x, target, softmax)
    xs = (x[:, None] - noise).reshape(b * runs, *x.shape[1:])
    drops = y0[:, None] - scores_of(ctx, xs, target.repeat_interleave(runs), softmax).reshape(b, runs)
    if normalize:
        beta = (dots * drops).mean(1) / (dots * dots).mean(1)
        beta = torch.where(torch.isfinite(beta), beta, torch.zeros_like(beta))
        dots = dots * beta[:, None]
    return ((dots - drops) ** 2).mean(1)


def patch_infidelity(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, patch_size: int,
                     baseline: Tensor, softmax: bool = False) -> Tensor:
    """Infidelity with cumulative patch removal (Quantus's ``Infidelity``): patches in row-major
    order are replaced by the baseline one after another; mean over the steps of
    (f(x) - f(x̃) - sum(a * (x - x̃)))²."""
    grid = [math.ceil(s / patch_size) for s in x.shape[2:]]
    n = math.prod(grid)
    ranks = expand_patches(torch.arange(n, device=x.device).reshape(1, 1, *grid), patch_size, x.shape[2:])
    ranks = ranks.expand(x.shape[0], -1, *x.shape[2:])
    thresholds = torch.arange(1, n + 1, device=x.device)
    y0 = reference_scores_of(ctx, x, target, softmax)
    drops = y0[:, None] - perturbation_curve(ctx, x, ranks, thresholds, baseline, target, softmax, features=n)
    a = attribution.expand_as(x)
    view = (1, -1) + (1,) * (x.dim() - 1)
    removed = ranks[:, None] < thresholds.reshape(view)  # (B, T, 1, *S)
    sums = ((x - baseline) * a)[:, None].mul(removed).reshape(x.shape[0], n, -1).sum(-1)
    return ((drops - sums) ** 2).mean(1)


def infidelity(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, perturbation: str = "noise",
               n_perturbations: int = 32, noise_std: float = 0.1, normalize: bool = True, patch_size: int = 4,
               baseline: str = "min", value: float = 0.0, blur_sigma: float = 5.0, softmax: bool = False) -> MetricResult:
    """Infidelity (Yeh et al. 2019): the expected squared difference between the attribution's
    prediction of a perturbation's effect, sum(a * I), and the actual score drop f(x) - f(x - I)
    (lower is better). ``perturbation="noise"``: I ~ N(0, noise_std²), ``n_perturbations`` of them,
    with Captum's ``normalize`` (Captum's ``infidelity``); ``"patches"``: patches of ``patch_size``
    replaced by the baseline cumulatively (Quantus's ``Infidelity``)."""
    if perturbation == "noise":
        runs = _check_int("n_perturbations", n_perturbations)
        noise = noise_std * ctx.randn((x.shape[0], runs, *x.shape[1:]), x.device, x.dtype)
        values = noise_infidelity(ctx, x, attribution, target, noise, softmax, normalize)
    elif perturbation == "patches":
        base = make_baseline(ctx, x, baseline, value, blur_sigma)
        values = patch_infidelity(ctx, x, attribution, target, _check_int("patch_size", patch_size), base, softmax)
    else:
        raise ConfigError("params.perturbation", f"unknown perturbation {perturbation!r}; valid: noise, patches")
    return MetricResult(values)


def _infidelity_passes(params, shape):
    if params["perturbation"] == "patches":
        return 1 + _n_features(shape, int(params["patch_size"]))
    return 1 + int(params["n_perturbations"])


for _spec in (
    MetricSpec("deletion", "faithfulness", "Petsiuk, Das, Saenko 2018, RISE: Randomized Input Sampling for "
               "Explanation of Black-box Models (BMVC), deletion metric", deletion, keyword_defaults(deletion),
               higher_is_better=_higher_unless_morf, passes=_deletion_passes,
               summary="area under the score curve as the most relevant features are removed"),
    MetricSpec("insertion", "faithfulness", "Petsiuk, Das, Saenko 2018, RISE: Randomized Input Sampling for "
               "Explanation of Black-box Models (BMVC), insertion metric", insertion, keyword_defaults(insertion),
               higher_is_better=lambda p: p["order"] == "morf", passes=_deletion_passes,
               summary="area under the score curve as the most relevant features are inserted into a blurred input"),
    MetricSpec("pixel_flipping", "faithfulness", "Bach et al. 2015, On Pixel-Wise Explanations for Non-Linear "
               "Classifier Decisions by Layer-Wise Relevance Propagation (PLoS ONE)", pixel_flipping,
               keyword_defaults(pixel_flipping), higher_is_better=_higher_unless_morf, passes=_pixel_flipping_passes,
               summary="area under the score as pixels are flipped to the baseline, most relevant first"),
    MetricSpec("region_perturbation", "faithfulness", "Samek et al. 2017, Evaluating the Visualization of What a "
               "Deep Neural Network Has Learned (IEEE TNNLS)", region_perturbation, keyword_defaults(region_perturbation),
               higher_is_better=lambda p: p["order"] == "morf", passes=_region_passes,
               summary="AOPC: mean score drop as patches are replaced, most relevant first"),
    MetricSpec("faithfulness_correlation", "faithfulness", "Bhatt, Weller, Moura 2020, Evaluating and Aggregating "
               "Feature-based Model Explanations (IJCAI)", faithfulness_correlation,
               keyword_defaults(faithfulness_correlation), higher_is_better=True,
               passes=lambda p, s: 1 + int(p["nr_runs"]),
               summary="correlation of subset relevance with the score drop when the subset is removed"),
    MetricSpec("infidelity", "faithfulness", "Yeh et al. 2019, On the (In)fidelity and Sensitivity of Explanations "
               "(NeurIPS)", infidelity, keyword_defaults(infidelity), higher_is_better=False, passes=_infidelity_passes,
               summary="squared error of the attribution's prediction of a perturbation's effect"),
):
    register(dataclasses.replace(_spec, rules=RULES))
