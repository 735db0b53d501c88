"""esegeta's explanation metrics: the registry, the controls on the digits sample, 2D and 3D inputs,
batching (chunk size does not change a value), device-correctness on the meta device, and the
ROAD imputation's own properties. Equality with Quantus is in test_metrics_quantus.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esegeta.errors import ConfigError
from esegeta.evaluation import Context, all_metrics, metric
from esegeta.evaluation.base import GROUPS, NEEDS, SharedPasses, inference_copy
from esegeta.evaluation import road
from esegeta.evaluation.road import linear_imputation, neighbour_kernel

# Small enough to keep every metric to a few forward passes per input.
QUICK = {
    "pixel_flipping": {"features_in_step": 16},
    "region_perturbation": {"patch_size": 2, "regions_evaluation": 4},
    "faithfulness_correlation": {"nr_runs": 5, "subset_size": 8},
    "infidelity": {"n_perturbations": 4},
    "road": {"percentages": (20, 60)},
    "deletion": {"steps": 4},
    "insertion": {"steps": 4},
    "smooth_mprt": {"nr_samples": 3},
    "max_sensitivity": {"nr_samples": 3},
    "local_lipschitz_estimate": {"nr_samples": 3},
    "top_k_intersection": {"k": 10},
}


def gradient(model, x, target):
    """Plain gradient of the target score (a re-explain callable that works on any device)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        score = model(x).gather(1, target.reshape(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, x)
    return grad


def tiny_cnn(dims: int) -> nn.Module:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
    torch.manual_seed(0)
    return nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), pool(1), nn.Flatten(), nn.Linear(4, 3)).eval()


@pytest.fixture(scope="module")
def digits16():
    from sklearn.datasets import load_digits

    from samples.models import DigitResNet
    from tests.conftest import _load

    data = load_digits()
    x = torch.tensor(data.images[:16] / 16.0, dtype=torch.float32)[:, None]
    return _load(DigitResNet(), "digit_resnet.pt"), x, torch.tensor(data.target[:16])


def _batch(dims: int, device="cpu"):
    shape = (3, 2) + ((10, 9) if dims == 2 else (6, 7, 5))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(dims)).to(device)
    a = torch.randn(shape, generator=torch.Generator().manual_seed(10 + dims)).to(device)
    mask = (torch.rand((3, 1) + shape[2:], generator=torch.Generator().manual_seed(20 + dims)) > 0.6).to(device)
    return x, a, torch.tensor([0, 2, 1], device=device), mask


# --------------------------------------------------------------------------- registry
def test_registry_lists_every_group_with_papers_and_defaults():
    specs = all_metrics()
    ids = [s.id for s in specs]
    assert len(ids) == len(set(ids)) == 20
    assert {s.group for s in specs} == set(GROUPS)
    for spec in specs:
        assert spec.paper and spec.summary and spec.needs <= NEEDS
        assert spec.with_defaults() == dict(spec.params)
        assert isinstance(spec.better_higher(), bool)
        assert spec.forward_passes((1, 8, 8)) >= 0
    assert metric("deletion").forward_passes((1, 8, 8), {"steps": 10}) == 11
    assert metric("pixel_flipping").forward_passes((3, 224, 224)) == 224 * 224
    assert metric("road").forward_passes((1, 8, 8, 8)) == 9
    assert metric("deletion").better_higher() is False and metric("deletion").better_higher({"order": "lerf"}) is True


def test_unknown_metric_and_parameter_name_the_field_and_the_fix():
    with pytest.raises(ConfigError, match="did you mean deletion"):
        metric("deletio")
    with pytest.raises(ConfigError) as err:
        metric("deletion").with_defaults({"step": 3}, path="evaluation.metrics[0].params")
    assert err.value.path == "evaluation.metrics[0].params.step" and "did you mean steps" in str(err.value)
    ctx = Context(model=tiny_cnn(2))
    x, a, t, _ = _batch(2)
    with pytest.raises(ConfigError, match="baseline"):
        metric("deletion")(ctx, x, a, t, baseline="zeros")
    with pytest.raises(ConfigError, match="neighbours"):
        metric("road")(ctx, x, a, t, neighbours=6)
    with pytest.raises(ConfigError, match="needs mask"):
        metric("pointing_game")(ctx, x, a, t)


# --------------------------------------------------------------------------- controls on the digits sample
def test_random_attribution_scores_worse_than_integrated_gradients(digits16):
    from captum.attr import IntegratedGradients

    model, x, y = digits16
    ig = IntegratedGradients(model).attribute(x, target=y, n_steps=32).detach()
    random = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    ctx = Context(model=model)
    for name, params in (("deletion", {"softmax": True}), ("road", {})):
        spec = metric(name)
        assert not spec.better_higher(params)
        with_ig, with_random = spec(ctx, x, ig, y, **params).values, spec(ctx, x, random, y, **params).values
        assert with_ig.mean() < with_random.mean() - 0.1, name
        assert (with_ig < with_random).float().mean() >= 0.75, name


def test_mprt_flags_an_edge_filter_and_passes_saliency(digits16):
    model, x, y = digits16
    kernel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])

    def edge_filter(model, x, target):  # ignores the model: must fail the sanity check
        gx = F.conv2d(x, kernel[None, None], padding=1)
        gy = F.conv2d(x, kernel.T[None, None], padding=1)
        return (gx**2 + gy**2).sqrt()

    for explain, fails in ((edge_filter, True), (gradient, False)):
        ctx = Context(model=model, explain=explain)
        result = metric("mprt")(ctx, x, explain(model, x, y), y)
        assert result.curves["similarity"].shape == (16, 13)
        if fails:
            assert result.values.min() > 0.99
        else:
            assert result.values.mean() < 0.3
    before = [p.clone() for p in model.parameters()]
    metric("efficient_mprt")(Context(model=model, explain=gradient), x, gradient(model, x, y), y)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # the user's model is untouched


# --------------------------------------------------------------------------- 2D and 3D, batching, devices
@pytest.mark.parametrize("dims", [2, 3])
def test_every_metric_runs_batched_in_2d_and_3d(dims):
    model = tiny_cnn(dims)
    x, a, t, mask = _batch(dims)
    for spec in all_metrics():
        params = QUICK.get(spec.id, {})
        small = spec(Context(model=model, explain=gradient, mask=mask, max_batch=2, seed=3), x, a, t, **params)
        large = spec(Context(model=model, explain=gradient, mask=mask, max_batch=512, seed=3), x, a, t, **params)
        assert small.values.shape == (3,), spec.id
        assert torch.isfinite(small.values).all() or spec.group == "localisation", spec.id
        torch.testing.assert_close(small.values, large.values, rtol=1e-4, atol=1e-5, msg=spec.id)  # chunking is invisible


def test_every_metric_is_device_correct_on_meta():
    """Every tensor a metric creates lives on the input's device: meta refuses any CPU mix."""
    model = tiny_cnn(3).to("meta")
    x, a, t, mask = _batch(3, "meta")
    for spec in all_metrics():
        result = spec(Context(model=model, explain=gradient, mask=mask), x, a, t, **QUICK.get(spec.id, {}))
        assert result.values.device.type == "meta" and result.values.shape == (3,), spec.id
        for curve in (result.curves or {}).values():
            assert curve.device.type == "meta", spec.id


def test_curves_have_one_column_per_step():
    model = tiny_cnn(2)
    x, a, t, _ = _batch(2)
    ctx = Context(model=model)
    deletion = metric("deletion")(ctx, x, a, t, steps=5)
    assert deletion.curves["score"].shape == (3, 6)
    assert torch.allclose(deletion.curves["fraction"][0], torch.linspace(0, 1, 6))
    flipping = metric("pixel_flipping")(ctx, x, a, t, features_in_step=7)
    assert flipping.curves["score"].shape == (3, math.ceil(90 / 7))
    # the last step of deletion is the baseline itself, for every attribution
    empty = ctx.scores(torch.zeros_like(x)).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(deletion.curves["score"][:, -1], empty)


# --------------------------------------------------------------------------- ROAD imputation
@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("dims,neighbours", [(2, 4), (2, 8), (3, 6), (3, 26)])
def test_imputation_reproduces_a_linear_ramp_and_keeps_known_pixels(dims, neighbours, solver):
    shape = (7, 8) if dims == 2 else (6, 7, 5)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    ramp = (0.3 * grids[0] - 0.2 * grids[1] + 1.0)[None, None]
    removed = torch.zeros((1, 1) + shape, dtype=torch.bool)
    removed[(0, 0) + tuple(slice(1, s - 1) for s in shape)] = True  # interior unknown, the border known
    imputed = linear_imputation(ramp, removed, neighbours, tol=1e-12, solver=solver)
    torch.testing.assert_close(imputed, ramp, rtol=0, atol=1e-9)  # a linear function is harmonic for any symmetric kernel
    kernel = neighbour_kernel(dims, neighbours, dtype=torch.float64)
    assert abs(kernel.sum().item() - 1) < 1e-12 and int((kernel > 0).sum()) == neighbours


@pytest.mark.parametrize("dims,neighbours", [(2, 8), (3, 6)])
def test_direct_and_iterative_imputation_agree(dims, neighbours):
    """The CPU's sparse LU and the accelerators' conjugate gradients solve the same system; a removed
    region with no known neighbour (here the whole second image) is 0 with both."""
    shape = (9, 8) if dims == 2 else (5, 6, 4)
    g = torch.Generator().manual_seed(3)
    x = torch.rand((2, 3) + shape, generator=g, dtype=torch.float64)
    removed = torch.rand((2, 1) + shape, generator=g) < 0.6
    removed[1] = True
    direct = linear_imputation(x, removed, neighbours, solver="direct")
    iterative = linear_imputation(x, removed, neighbours, tol=1e-13, solver="cg")
    torch.testing.assert_close(direct, iterative, rtol=0, atol=1e-9)
    assert torch.equal(direct[~removed.expand_as(x)], x[~removed.expand_as(x)]) and not direct[1].any()


def test_direct_imputation_stacks_rows_as_it_solves_them_one_by_one(monkeypatch):
    """Rows stacked into one block-diagonal system (one row wholly removed: no known neighbour, so 0; one
    untouched) give each row's own solution."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand((4, 2, 12, 11), generator=g, dtype=torch.float64)
    removed = torch.rand((4, 1, 12, 11), generator=g) < 0.7
    removed[1], removed[2] = True, False
    stacked = linear_imputation(x, removed, 8, solver="direct")
    monkeypatch.setattr(road, "UNKNOWNS_PER_SOLVE", 1)  # one row per factorisation
    alone = linear_imputation(x, removed, 8, solver="direct")
    torch.testing.assert_close(stacked, alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(stacked, linear_imputation(x, removed, 8, tol=1e-13, solver="cg"), rtol=0, atol=1e-9)
    assert not stacked[1].any() and torch.equal(stacked[2], x[2])


def test_isolated_removed_pixels_take_their_known_neighbours_weighted_mean():
    """A removed pixel with no removed neighbour is solved in closed form; beside a removed region and
    an image wholly removed (0), it equals conjugate gradients and the mean the ROAD authors define."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand((2, 3, 10, 9), generator=g, dtype=torch.float64)
    removed = torch.zeros((2, 1, 10, 9), dtype=torch.bool)
    removed[0, 0, ::3, ::3] = True  # isolated pixels, corners and edges included
    removed[0, 0, 4:7, 5:8] = True  # and a coupled region
    removed[1] = True
    direct = linear_imputation(x, removed, 8, solver="direct")
    torch.testing.assert_close(direct, linear_imputation(x, removed, 8, tol=1e-13, solver="cg"), rtol=0, atol=1e-9)
    kernel = neighbour_kernel(2, 8, dtype=torch.float64)[0, 0]
    weights = F.conv2d(torch.ones(1, 1, 10, 9, dtype=torch.float64), kernel[None, None], padding=1)[0, 0]
    means = F.conv2d(x[:1].transpose(0, 1), kernel[None, None], padding=1).transpose(0, 1)[0] / weights
    torch.testing.assert_close(direct[0, :, 0, 3], means[:, 0, 3], rtol=0, atol=1e-12)
    torch.testing.assert_close(direct[0, :, 9, 0], means[:, 9, 0], rtol=0, atol=1e-12)
    assert not direct[1].any()


def test_cpu_forward_by_default_takes_at_most_eight_rgb_224_images_and_a_given_max_batch_as_given():
    """On the CPU a bigger batch of big inputs is no faster per input (slower at 224²): by default the
    forward takes at most CPU_FORWARD_VALUES values per call (8 RGB images of 224²) and small inputs
    go 64 at a time; a ``max_batch`` the user gives is taken as given."""
    sizes = []

    def forward(batch):
        sizes.append(batch.shape[0])
        return batch.flatten(1)[:, :3]

    big = torch.rand(40, 3, 224, 224)
    scores = Context(forward=forward).scores(big)
    assert sizes == [8] * 5 and torch.equal(scores, big.flatten(1)[:, :3])
    sizes.clear()
    Context(forward=forward, max_batch=5).scores(big)
    assert sizes == [5] * 8
    sizes.clear()
    Context(forward=forward, max_batch=32).scores(big)
    assert sizes == [32, 8]
    sizes.clear()
    Context(forward=forward).scores(torch.rand(100, 1, 32, 32))
    assert sizes == [64, 36]
    assert Context(forward=forward).batch(torch.rand(1, 3, 2048, 2048)) == 1
    assert Context(forward=forward, max_batch=4).batch(torch.rand(1, 3, 2048, 2048)) == 4


def test_a_model_in_eval_mode_is_scored_without_walking_its_modules_and_a_training_one_is_restored():
    """eval() and train() walk every module on each forward call (16 % of a pass on a small net); a model
    wholly in eval mode is called as it is, one in training mode is scored in eval mode and restored."""
    class Counting(nn.Sequential):
        switches = 0

        def train(self, mode=True):
            Counting.switches += 1
            return super().train(mode)

    model = Counting(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    x = torch.rand(5, 2, 6, 6)
    model(x)  # the lazy layer's shape; the BatchNorm's statistics move in training mode
    model.eval()
    expected = model(x)
    Counting.switches = 0
    torch.testing.assert_close(Context(model=model, use_inference_copy=False, max_batch=2).scores(x), expected)
    assert Counting.switches == 0
    model.train()
    running = model[1].running_mean.clone()
    torch.testing.assert_close(Context(model=model, use_inference_copy=False, max_batch=2).scores(x), expected)
    assert model.training and model[1].training and torch.equal(model[1].running_mean, running)


@pytest.mark.parametrize("shape", [(2, 3, 40, 33), (1, 2, 12, 10, 9)])
def test_blur_baseline_equals_scipy_by_band_matrix_and_by_convolution(shape, monkeypatch):
    """The blur baseline is a separable Gaussian with replicated edges (scipy's ``gaussian_filter``,
    mode ``nearest``), by a band-matrix product per axis, and by convolutions along long axes."""
    from scipy.ndimage import gaussian_filter

    from esegeta.evaluation import faithfulness

    x = torch.rand(shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    expected = gaussian_filter(x.numpy(), sigma=(0, 0) + (5.0,) * (len(shape) - 2), mode="nearest", truncate=3.0)
    torch.testing.assert_close(faithfulness.gaussian_blur(x, 5.0), torch.from_numpy(expected), rtol=0, atol=1e-12)
    monkeypatch.setattr(faithfulness, "BAND_LENGTH", 10)  # the longer axes convolved
    torch.testing.assert_close(faithfulness.gaussian_blur(x, 5.0), torch.from_numpy(expected), rtol=0, atol=1e-12)


def test_road_noise_comes_from_the_seeded_generator():
    model = tiny_cnn(2)
    x, a, t, _ = _batch(2)
    first = metric("road")(Context(model=model, seed=5), x, a, t, noise=0.5).values
    again = metric("road")(Context(model=model, seed=5), x, a, t, noise=0.5).values
    other = metric("road")(Context(model=model, seed=6), x, a, t, noise=0.5).values
    assert torch.equal(first, again) and not torch.equal(first, other)


#: Metrics that draw no random numbers with these parameters: CUDA must reproduce the CPU's values.
DETERMINISTIC = {"deletion", "insertion", "pixel_flipping", "region_perturbation", "road", "pointing_game",
                 "energy_pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy", "top_k_intersection",
                 "sparseness", "complexity"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the GPU lane (make test-cuda) runs it")
@pytest.mark.parametrize("dims", [2, 3])
def test_every_metric_runs_on_cuda_and_matches_the_cpu(dims):
    model = tiny_cnn(dims)
    x, a, t, mask = _batch(dims)
    params = {**QUICK, "road": {"percentages": (20, 60), "noise": 0.0}, "region_perturbation": {
        "patch_size": 2, "regions_evaluation": 4, "baseline": "value"}}
    with torch.backends.cudnn.flags(allow_tf32=False):
        for spec in all_metrics():
            p = params.get(spec.id, {})
            gpu = spec(Context(model=model.cuda(), explain=gradient, mask=mask.cuda()), x.cuda(), a.cuda(), t.cuda(), **p)
            assert gpu.values.device.type == "cuda", spec.id
            if spec.id in DETERMINISTIC:
                cpu = spec(Context(model=model.cpu(), explain=gradient, mask=mask), x, a, t, **p)
                torch.testing.assert_close(gpu.values.cpu(), cpu.values, rtol=1e-4, atol=1e-5, equal_nan=True, msg=spec.id)


def test_pointing_game_tolerance_and_energy_share():
    a = torch.zeros(1, 1, 9, 9)
    a[0, 0, 4, 6] = 1.0  # the maximum, two pixels right of the mask
    a[0, 0, 4, 2] = 0.5
    a[0, 0, 0, 0] = -3.0  # negative relevance is not energy
    mask = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    mask[0, 0, 3:6, 2:5] = True
    ctx = Context(model=tiny_cnn(2), mask=mask)
    x, t = torch.zeros(1, 2, 9, 9), torch.tensor([0])
    hits = [metric("pointing_game")(ctx, x, a, t, tolerance=r).values.item() for r in (0, 1, 2)]
    assert hits == [0.0, 0.0, 1.0]
    assert metric("energy_pointing_game")(ctx, x, a, t).values.item() == pytest.approx(0.5 / 1.5, abs=1e-6)
    assert metric("relevance_rank_accuracy")(ctx, x, a, t).values.item() == pytest.approx(1 / 9)


@pytest.mark.parametrize("shape", [(3, 1, 12, 12), (2, 1, 8, 8), (2, 1, 9, 10, 11)])
def test_ssim_equals_scikit_image(shape):
    from skimage.metrics import structural_similarity

    from esegeta.evaluation.similarity import ssim

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=generator, dtype=torch.float64)
    b = a + 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)
    expected = []
    for p, q in zip(a, b):
        both = torch.cat([p, q])
        expected.append(structural_similarity(p[0].numpy(), q[0].numpy(), data_range=float(both.max() - both.min())))
    torch.testing.assert_close(ssim(a, b), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- shared passes
class CountingCNN(nn.Module):
    """tiny_cnn that counts the inputs it scores (a class attribute: its copies count too)."""
    rows = 0

    def __init__(self):
        super().__init__()
        self.net = tiny_cnn(2)

    def forward(self, x):
        type(self).rows += x.shape[0]
        return self.net(x)


def test_metrics_share_the_passes_of_the_unperturbed_input_and_the_baseline():
    """With one SharedPasses, the unperturbed input (region perturbation's and infidelity's reference,
    deletion's first step) and the input wholly replaced by the baseline (deletion's and pixel
    flipping's last step) are scored once; the values are those of each metric alone."""
    model = CountingCNN().eval()
    x, a, t, _ = _batch(2)
    x, t = x[:1].expand(3, -1, -1, -1), t[:1].expand(3)  # one input, three methods' maps (as the engine stacks them)
    params = {"deletion": {"steps": 4}, "pixel_flipping": {"features_in_step": 16, "baseline": "value"},
              "region_perturbation": {"patch_size": 2, "regions_evaluation": 4},
              "infidelity": {"n_perturbations": 4}}
    alone, rows_alone = {}, 0
    for name, p in params.items():
        CountingCNN.rows = 0
        alone[name] = metric(name)(Context(model=model, seed=1), x, a, t, **p).values
        rows_alone += CountingCNN.rows
    shared, together = SharedPasses(), {}
    CountingCNN.rows = 0
    for name, p in params.items():
        together[name] = metric(name)(Context(model=model, seed=1, shared=shared), x, a, t, **p).values
    flips = math.ceil(math.prod(x.shape[2:]) / 16)
    perturbed = 3 * ((5 - 2) + (flips - 1) + 4 + 4)  # three maps' rows per step that depends on the map
    assert rows_alone == perturbed + 2 + 1 + 1 + 1  # unperturbed and baseline once per metric that meets them
    assert CountingCNN.rows == perturbed + 2  # ... and once in all
    for name in params:
        torch.testing.assert_close(together[name], alone[name], rtol=1e-5, atol=1e-6)


def test_shared_passes_never_give_one_input_the_scores_of_another():
    model = CountingCNN().eval()
    x, a, t, _ = _batch(2)
    shared = SharedPasses()
    first = metric("region_perturbation")(Context(model=model, shared=shared), x[:1], a[:1], t[:1], patch_size=2,
                                          regions_evaluation=2, baseline="value").values
    second = metric("region_perturbation")(Context(model=model, shared=shared), x[1:], a[1:], t[1:], patch_size=2,
                                           regions_evaluation=2, baseline="value").values
    both = metric("region_perturbation")(Context(model=model), x, a, t, patch_size=2, regions_evaluation=2,
                                         baseline="value").values
    torch.testing.assert_close(torch.cat([first, second]), both, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the evaluation's inference copy
def _conv_bn_net() -> nn.Module:
    """A torch-only classifier whose BatchNorms hold non-trivial statistics (in training mode, as a user may leave it)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    return net


def test_inference_copy_folds_batchnorm_keeps_values_and_leaves_the_model_alone():
    model = _conv_bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    fast = inference_copy(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # folded into the convolutions
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fast.parameters() if p.dim() == 4)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-6)
    a = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    t = torch.zeros(4, dtype=torch.long)
    for name, params in (("deletion", {"steps": 4}), ("road", {"percentages": (20, 60)})):
        folded = metric(name)(Context(model=model, seed=1), x, a, t, **params).values
        plain = metric(name)(Context(model=model, seed=1, use_inference_copy=False), x, a, t, **params).values
        torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-6)


def test_inference_copy_does_not_trace_user_code_or_hooked_models():
    """A user's own forward is not traced (its class counter stays a number) and a hooked model keeps its
    hooks (its BatchNorms are not folded away from them); both are still copied, values unchanged. A
    model deepcopy refuses gets no copy and is scored itself."""
    CountingCNN.rows = 0
    counting = CountingCNN().eval()
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(inference_copy(counting)(x), counting(x))
    assert CountingCNN.rows == 2 * 2  # both forwards counted, none traced
    hooked, seen = _conv_bn_net().eval(), []
    handle = hooked[1].register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    try:
        fast = inference_copy(hooked)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) == 2
        with torch.no_grad():
            fast(torch.randn(3, 3, 8, 8))
        assert seen == [3]
    finally:
        handle.remove()
    holding = _conv_bn_net().eval()
    holding.past = torch.ones(1, requires_grad=True) * 2  # a tensor of an autograd graph: deepcopy refuses it
    assert inference_copy(holding) is None
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(Context(model=holding).scores(x), holding(x))  # scored with the model itself


def test_evaluate_scores_on_the_inference_copy_or_on_the_model_alike(monkeypatch):
    """``esegeta.evaluate`` (the engine) scores on one folded copy per evaluation by default, also with
    per-input targets; ``inference_copy=False`` scores with the model itself; the values agree and the
    user's model keeps its BatchNorms. No copy is made where it would not pay off: inputs smaller than
    3x128² values, or fewer than 16 passes in all."""
    import esegeta
    from esegeta.evaluation import base

    made = []
    monkeypatch.setattr(base, "inference_copy", lambda model, make=base.inference_copy: made.append(1) or make(model))
    model = _conv_bn_net().eval()
    small = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    metrics = [{"id": "deletion", "params": {"steps": 6}}, {"id": "road", "params": {"percentages": [30, 70]}}]
    esegeta.evaluate(model, small, {"a": torch.randn(small.shape)}, metrics)
    assert not made  # small inputs: the model itself is as fast
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    maps = {"a": torch.randn(x.shape, generator=torch.Generator().manual_seed(6))}
    esegeta.evaluate(model, x, maps, ["sparseness"])
    assert not made  # no forward pass to speed up
    folded = esegeta.evaluate(model, x, maps, metrics)  # 2 inputs x (7 + 2) passes
    assert len(made) == 1
    esegeta.evaluate(model, x, maps, metrics, target=[0, 1])
    assert len(made) == 2
    plain = esegeta.evaluate(model, x, maps, metrics, inference_copy=False)
    assert len(made) == 2
    for i in range(2):
        for m in ("deletion", "road"):
            assert folded.value("a", m, f"input{i}") == pytest.approx(plain.value("a", m, f"input{i}"), rel=1e-5, abs=1e-6)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2
