"""Robustness metrics: does the explanation stay put when the input barely moves?

Each metric explains ``nr_samples`` perturbed copies of every input with the context's
``explain(model, x, target)``; all B · nr_samples copies are explained in chunks of at most
``max_batch`` inputs. Noise is drawn from the context's generator on the input's device.
"""
from __future__ import annotations

import dataclasses

from torch import Tensor

from esegeta.errors import ConfigError
from esegeta.evaluation.base import Context, MetricResult, MetricSpec, Rule, keyword_defaults, register
from esegeta.evaluation.randomisation import explain_batched


def _explain_perturbed(ctx: Context, x: Tensor, target: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    b, runs = noise.shape[:2]
    xs = (x[:, None] + noise).reshape(b * runs, *x.shape[1:])
    a = explain_batched(ctx, ctx.model, xs, target.repeat_interleave(runs))
    return xs.reshape(b, runs, -1), a.reshape(b, runs, -1)


def sensitivity_for(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, noise: Tensor) -> Tensor:
    """(B, R) ||a(x + noise_r) - a(x)|| / ||a(x)|| for given perturbations ``noise`` (B, R, C, *S)."""
    _, a = _explain_perturbed(ctx, x, target, noise)
    ref = attribution.reshape(x.shape[0], 1, -1)
    if a.shape[-1] != ref.shape[-1]:
        raise ConfigError("evaluation.metrics", "the re-explanation's shape differs from the attribution's")
    return (a - ref).norm(dim=-1) / ref.norm(dim=-1)


def lipschitz_for(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, noise: Tensor) -> Tensor:
    """(B, R) ||a(x') - a(x)|| / (||x' - x|| + 1e-10), x' = x + noise_r, for given ``noise`` (B, R, C, *S)."""
    xs, a = _explain_perturbed(ctx, x, target, noise)
    ref = attribution.reshape(x.shape[0], 1, -1)
    return (a - ref).norm(dim=-1) / ((xs - x.reshape(x.shape[0], 1, -1)).norm(dim=-1) + 1e-10)


def _runs(nr_samples) -> int:
    if isinstance(nr_samples, bool) or not isinstance(nr_samples, int) or nr_samples < 1:
        raise ConfigError("params.nr_samples", f"must be an integer >= 1, got {nr_samples!r}")
    return nr_samples


def max_sensitivity(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, nr_samples: int = 200,
                    radius: float = 0.2) -> MetricResult:
    """Max-sensitivity (Yeh et al. 2019): the largest relative change of the explanation,
    ||a(x + δ) - a(x)|| / ||a(x)||, over ``nr_samples`` δ uniform in [-radius, radius] per element
    (Quantus's ``MaxSensitivity``; lower is better)."""
    b, runs = x.shape[0], _runs(nr_samples)
    noise = (2 * ctx.rand((b, runs, *x.shape[1:]), x.device, x.dtype) - 1) * radius
    curve = sensitivity_for(ctx, x, attribution, target, noise)
    return MetricResult(curve.max(1).values, {"sensitivity": curve})


def local_lipschitz_estimate(ctx: Context, x: Tensor, attribution: Tensor, target: Tensor, *, nr_samples: int = 200,
                             std: float = 0.1) -> MetricResult:
    """Local Lipschitz estimate (Alvarez-Melis and Jaakkola 2018): the largest
    ||a(x') - a(x)|| / ||x' - x|| over ``nr_samples`` x' = x + N(0, std²) (Quantus's
    ``LocalLipschitzEstimate``; lower is better)."""
    b, runs = x.shape[0], _runs(nr_samples)
    noise = std * ctx.randn((b, runs, *x.shape[1:]), x.device, x.dtype)
    curve = lipschitz_for(ctx, x, attribution, target, noise)
    return MetricResult(curve.max(1).values, {"lipschitz": curve})


#: What the robustness metrics' parameters accept (checked with the config, before a run).
RULES = {"nr_samples": Rule("int", 1), "std": Rule("float", 0, open_low=True), "radius": Rule("float", 0, open_low=True)}
for _spec in (
    MetricSpec("max_sensitivity", "robustness", "Yeh et al. 2019, On the (In)fidelity and Sensitivity of Explanations "
               "(NeurIPS)", max_sensitivity, keyword_defaults(max_sensitivity), higher_is_better=False,
               needs={"model", "explain"}, explanations=lambda p, layers: int(p["nr_samples"]),
               summary="largest relative change of the explanation under small uniform noise"),
    MetricSpec("local_lipschitz_estimate", "robustness", "Alvarez-Melis and Jaakkola 2018, On the Robustness of "
               "Interpretability Methods (ICML workshop on human interpretability)", local_lipschitz_estimate,
               keyword_defaults(local_lipschitz_estimate), higher_is_better=False, needs={"model", "explain"},
               explanations=lambda p, layers: int(p["nr_samples"]),
               summary="largest ratio of explanation change to input change under Gaussian noise"),
):
    register(dataclasses.replace(_spec, rules=RULES))

__all__ = ["max_sensitivity", "local_lipschitz_estimate", "sensitivity_for", "lipschitz_for"]
