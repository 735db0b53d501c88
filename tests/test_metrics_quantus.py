"""esegeta's metrics equal Quantus 0.6.0's on the same model, inputs, attributions and settings.

Models: the digits sample classifier (DigitResNet + its checkpoint, 8 digits of 8x8) and a tiny
3-channel 2D CNN. Quantus is called with ``normalise=False`` and the ``abs`` esegeta uses, so both
sides see the same attributions. Where Quantus draws random numbers from numpy (subsets, noise,
the random class), the test seeds numpy, calls Quantus, then replays the same numpy draws in the
same order and hands them to esegeta's core function of the metric (the registered metric draws
the same kind of numbers from a torch generator instead). Where replaying is impossible (ROAD's
noise, SmoothMPRT's noise) the comparison runs on the deterministic setting (noise 0, one sample).

Tolerances (absolute unless said): curves and AUCs of scores 1e-5 · scale; correlations 1e-4;
ROAD accuracies exact and the imputation 1e-9 (float64); sparseness/complexity 1e-5;
localisation exact (pointing game, rank, top-k) or 1e-5 relative; MPRT per-layer Spearman 1e-4;
efficient MPRT 1e-4; robustness 1e-4 relative.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from esegeta.compat import import_torchvision

import_torchvision()
quantus = pytest.importorskip("quantus")

from captum.attr import Saliency  # noqa: E402
from quantus.functions.similarity_func import correlation_spearman  # noqa: E402

from esegeta.evaluation import Context, metric  # noqa: E402
from esegeta.evaluation.faithfulness import make_baseline, subset_correlation  # noqa: E402
from esegeta.evaluation.randomisation import random_logit_for  # noqa: E402
from esegeta.evaluation.road import linear_imputation  # noqa: E402
from esegeta.evaluation.robustness import lipschitz_for, sensitivity_for  # noqa: E402


def _digits():
    from sklearn.datasets import load_digits

    from tests.conftest import _load
    from samples.models import DigitResNet

    data = load_digits()
    x = torch.tensor(data.images[:8] / 16.0, dtype=torch.float32)[:, None]
    return _load(DigitResNet(), "digit_resnet.pt"), x, torch.tensor(data.target[:8])


def _tiny_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5)).eval()
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    return model, x, model(x).argmax(1).detach()


@pytest.fixture(scope="module")
def digits():
    model, x, y = _digits()
    a = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    return model, x, y, a


@pytest.fixture(scope="module")
def tiny():
    model, x, y = _tiny_cnn()
    a = torch.randn(x.shape[0], 1, *x.shape[2:], generator=torch.Generator().manual_seed(3))
    return model, x, y, a


def _np(t):
    return t.detach().cpu().numpy()


def _quantus(m, model, x, y, a, **kw):
    return np.asarray(m(model=model, x_batch=_np(x), y_batch=_np(y), a_batch=_np(a), channel_first=True,
                        device="cpu", **kw), dtype=np.float64)


def saliency(model, x, target):
    x = x.detach().clone().requires_grad_(True)
    return Saliency(model).attribute(x, target=target).detach()


def quantus_saliency(model, inputs, targets, **kwargs):
    return _np(saliency(model, torch.as_tensor(inputs), torch.as_tensor(targets)))


# --------------------------------------------------------------------------- faithfulness
@pytest.mark.parametrize("case", ["digits", "tiny"])
def test_pixel_flipping(case, request):
    model, x, y, a = request.getfixturevalue(case)
    c = x.shape[1]
    q = quantus.PixelFlipping(features_in_step=4 * c, perturb_baseline="black", normalise=False, abs=False,
                              disable_warnings=True)
    curves = _quantus(q, model, x, y, a, softmax=True)
    got = metric("pixel_flipping")(Context(model=model, max_batch=16), x, a, y, features_in_step=4, baseline="min")
    np.testing.assert_allclose(_np(got.curves["score"]), curves, atol=1e-5)
    np.testing.assert_allclose(_np(got.values), np.trapezoid(curves, axis=1), atol=1e-4)


def test_deletion_curve_is_pixel_flipping_from_the_unperturbed_input(digits):
    """Quantus has no deletion metric; its pixel flipping curve is the deletion curve without the start."""
    model, x, y, a = digits
    q = quantus.PixelFlipping(features_in_step=8, perturb_baseline="black", normalise=False, abs=False,
                              disable_warnings=True)
    curves = _quantus(q, model, x, y, a, softmax=True)
    got = metric("deletion")(Context(model=model), x, a, y, steps=8, baseline="min", softmax=True)
    np.testing.assert_allclose(_np(got.curves["score"][:, 1:]), curves, atol=1e-5)
    start = model(x).softmax(1).gather(1, y[:, None]).squeeze(1)
    np.testing.assert_allclose(_np(got.curves["score"][:, 0]), _np(start), atol=1e-6)


@pytest.mark.parametrize("case,patch,order", [("digits", 2, "morf"), ("digits", 2, "lerf"), ("tiny", 5, "morf")])
def test_region_perturbation(case, patch, order, request):
    """The tiny CNN's 12x12 inputs take 5x5 patches on a centred, padded grid (partial border patches)."""
    model, x, y, a = request.getfixturevalue(case)
    q = quantus.RegionPerturbation(patch_size=patch, regions_evaluation=10, perturb_baseline=0.0, normalise=False,
                                   abs=False, order=order, disable_warnings=True)
    curves = _quantus(q, model, x, y, a, softmax=True)
    got = metric("region_perturbation")(Context(model=model), x, a, y, patch_size=patch, regions_evaluation=10,
                                        baseline="value", value=0.0, order=order)
    np.testing.assert_allclose(_np(got.curves["drop"]), curves, atol=1e-5)
    np.testing.assert_allclose(_np(got.values), curves.mean(1), atol=1e-5)


def test_road_accuracy_curve_and_imputation(digits):
    from quantus.functions.perturb_func import noisy_linear_imputation

    model, x, y, a = digits
    percentages = [10, 30, 50, 70, 90]
    q = quantus.ROAD(percentages=percentages, noise=0.0, normalise=False, abs=False, disable_warnings=True)
    q(model=model, x_batch=_np(x), y_batch=_np(y), a_batch=_np(a), channel_first=True, device="cpu", softmax=True)
    got = metric("road")(Context(model=model), x, a, y, percentages=percentages, noise=0.0, tol=1e-8)
    np.testing.assert_array_equal(_np(got.curves["correct"]).mean(0), [q.evaluation_scores[p] for p in percentages])
    rng = np.random.default_rng(4)
    image = rng.random((3, 10, 9))
    removed = rng.choice(90, 55, replace=False)
    mask = torch.zeros(90, dtype=torch.bool)
    mask[torch.as_tensor(removed)] = True
    ours = linear_imputation(torch.tensor(image)[None], mask.reshape(1, 1, 10, 9), 8, tol=1e-13)[0]
    np.testing.assert_allclose(_np(ours), noisy_linear_imputation(image, removed, noise=0.0), atol=1e-9)


def test_faithfulness_correlation_replayed_subsets(digits):
    model, x, y, a = digits
    runs, size, n = 20, 16, 64
    q = quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=size, perturb_baseline="black", normalise=False,
                                        abs=False, return_aggregate=False, disable_warnings=True)
    np.random.seed(7)
    expected = _quantus(q, model, x, y, a, softmax=False)
    np.random.seed(7)
    subsets = torch.zeros(x.shape[0], runs, n, dtype=torch.bool)
    for r in range(runs):
        for b in range(x.shape[0]):
            subsets[b, r, torch.as_tensor(np.random.choice(n, size, replace=False))] = True
        np.random.uniform(size=x.shape[0])  # Quantus's baseline table draws a "uniform" entry on every call
    ctx = Context(model=model)
    values, _, _ = subset_correlation(ctx, x, a, y, subsets, make_baseline(ctx, x, "min"), softmax=False)
    np.testing.assert_allclose(_np(values), expected, atol=1e-4)


def test_infidelity_patches(digits):
    model, x, y, a = digits
    q = quantus.Infidelity(perturb_patch_sizes=[2], n_perturb_samples=1, perturb_baseline="black", normalise=False,
                           abs=False, disable_warnings=True)
    expected = _quantus(q, model, x, y, a, softmax=False)
    got = metric("infidelity")(Context(model=model), x, a, y, perturbation="patches", patch_size=2, baseline="min")
    np.testing.assert_allclose(_np(got.values), expected, rtol=1e-4, atol=1e-5)


def test_infidelity_noise_equals_captum(digits):
    from captum.metrics import infidelity as captum_infidelity

    from esegeta.evaluation.faithfulness import noise_infidelity

    model, x, y, a = digits
    runs = 6
    noise = 0.1 * torch.randn(x.shape[0], runs, *x.shape[1:], generator=torch.Generator().manual_seed(5))

    def perturb(inputs):
        flat = noise.reshape(-1, *x.shape[1:])
        return flat, inputs - flat

    expected = captum_infidelity(model, perturb, x, a, target=y, n_perturb_samples=runs, normalize=True)
    got = noise_infidelity(Context(model=model), x, a, y, noise, normalize=True)
    np.testing.assert_allclose(_np(got), _np(expected), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- complexity, localisation
def test_sparseness_and_complexity(digits):
    model, x, y, a = digits
    ctx = Context(model=model)
    for name, q in (("sparseness", quantus.Sparseness), ("complexity", quantus.Complexity)):
        expected = _quantus(q(abs=True, normalise=False, disable_warnings=True), model, x, y, a)
        np.testing.assert_allclose(_np(metric(name)(ctx, x, a, y).values), expected, atol=1e-5)


def test_localisation(digits):
    model, x, y, a = digits
    s = torch.zeros(x.shape[0], 1, 8, 8, dtype=torch.bool)
    s[:, :, 2:6, 1:5] = True
    s[1] = False  # an empty mask: NaN on both sides
    s[1, 0, 7, 7] = True
    s[2] = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(6)) > 0.5
    ctx = Context(model=model, mask=s)
    kw = dict(normalise=False, abs=False, disable_warnings=True)
    pairs = (
        ("pointing_game", quantus.PointingGame(**kw), {}),
        ("energy_pointing_game", quantus.AttributionLocalisation(positive_attributions=True, weighted=False, **kw), {}),
        ("relevance_mass_accuracy", quantus.RelevanceMassAccuracy(**kw), {}),
        ("relevance_rank_accuracy", quantus.RelevanceRankAccuracy(**kw), {}),
        ("top_k_intersection", quantus.TopKIntersection(k=10, **kw), {"k": 10}),
    )
    for name, q, params in pairs:
        expected = np.asarray(q(model=model, x_batch=_np(x), y_batch=_np(y), a_batch=_np(a), s_batch=_np(s).astype(float),
                                channel_first=True, device="cpu"), dtype=np.float64)
        got = _np(metric(name)(ctx, x, a, y, **params).values)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------- randomisation
@pytest.mark.parametrize("order", ["top_down", "independent"])
def test_mprt_per_layer(digits, order):
    model, x, y, _ = digits
    a = saliency(model, x, y)
    q = quantus.MPRT(layer_order=order, seed=42, similarity_func=correlation_spearman, abs=True, normalise=False,
                     disable_warnings=True)
    scores = q(model=model, x_batch=_np(x), y_batch=_np(y), a_batch=_np(a), channel_first=True, device="cpu",
               explain_func=quantus_saliency)
    expected = np.stack([scores[k] for k in scores if k != "original"], 1)
    got = metric("mprt")(Context(model=model, explain=saliency), x, a, y, order=order)
    np.testing.assert_allclose(_np(got.curves["similarity"]), expected, atol=1e-4)
    np.testing.assert_allclose(_np(got.values), expected[:, -1], atol=1e-4)


def test_smooth_mprt_deterministic_setting(digits):
    """One noise-free sample per explanation: SmoothMPRT's randomness switched off on both sides.
    (Quantus's SmoothMPRT explains with its own ``quantus.explain``, a plain gradient, whatever the
    ``explain_func``; with ``abs=True`` that equals the Saliency esegeta re-explains with.)"""
    model, x, y, _ = digits
    a = saliency(model, x, y)
    q = quantus.SmoothMPRT(layer_order="bottom_up", seed=42, nr_samples=1, similarity_func=correlation_spearman,
                           abs=True, normalise=False, disable_warnings=True, return_last_correlation=True)
    expected = q(model=model, x_batch=_np(x), y_batch=_np(y), a_batch=_np(a), channel_first=True, device="cpu",
                 explain_func=quantus_saliency)
    got = metric("smooth_mprt")(Context(model=model, explain=saliency), x, a, y, nr_samples=1)
    np.testing.assert_allclose(_np(got.values), np.asarray(expected), atol=1e-4)


def test_efficient_mprt(digits):
    model, x, y, _ = digits
    a = saliency(model, x, y)
    q = quantus.EfficientMPRT(seed=42, complexity_func_kwargs={"n_bins": 100}, abs=False, normalise=False,
                              disable_warnings=True)
    expected = q(model=model, x_batch=_np(x), y_batch=_np(y), a_batch=_np(a), channel_first=True, device="cpu",
                 explain_func=quantus_saliency)
    got = metric("efficient_mprt")(Context(model=model, explain=saliency), x, a, y, n_bins=100)
    np.testing.assert_allclose(_np(got.values), np.asarray(expected), atol=1e-4)


def test_random_logit_replayed_class(digits):
    model, x, y, _ = digits
    a = saliency(model, x, y)
    q = quantus.RandomLogit(num_classes=10, seed=42, similarity_func=correlation_spearman, abs=False, normalise=False,
                            disable_warnings=True)
    expected = q(model=model, x_batch=_np(x), y_batch=_np(y), a_batch=_np(a), channel_first=True, device="cpu",
                 explain_func=quantus_saliency)
    np.random.seed(42)
    b = x.shape[0]
    off = np.random.randint(0, 9, b)
    classes = np.stack([np.delete(np.arange(10), t) for t in _np(y)])
    other = torch.as_tensor(classes[np.arange(b), off])
    got = random_logit_for(Context(model=model, explain=saliency), x, a, y, other)
    np.testing.assert_allclose(_np(got.values), np.asarray(expected), atol=1e-4)


# --------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("name", ["max_sensitivity", "local_lipschitz_estimate"])
def test_robustness_replayed_noise(digits, name):
    model, x, y, _ = digits
    a = saliency(model, x, y)
    runs, b, n = 4, x.shape[0], x[0].numel()
    kw = dict(nr_samples=runs, normalise=False, abs=False, disable_warnings=True)
    if name == "max_sensitivity":
        q, draw, core = quantus.MaxSensitivity(lower_bound=0.2, **kw), lambda: np.random.uniform(-0.2, 0.2, (b, n)), \
            sensitivity_for
    else:
        q, draw, core = quantus.LocalLipschitzEstimate(perturb_std=0.1, **kw), lambda: np.random.normal(0.0, 0.1, (b, n)), \
            lipschitz_for
    np.random.seed(9)
    expected = q(model=model, x_batch=_np(x), y_batch=_np(y), a_batch=_np(a), channel_first=True, device="cpu",
                 explain_func=quantus_saliency)
    np.random.seed(9)
    noise = torch.tensor(np.stack([draw() for _ in range(runs)], 1), dtype=torch.float32).reshape(b, runs, *x.shape[1:])
    got = core(Context(model=model, explain=saliency), x, a, y, noise).max(1).values
    np.testing.assert_allclose(_np(got), np.asarray(expected), rtol=1e-4)
