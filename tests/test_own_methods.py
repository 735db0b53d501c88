"""esegeta's own methods against their definitions (CAM, PatternNet/PatternAttribution,
guided backprop of a layer channel), on the real sample models and on synthetic data."""
from __future__ import annotations

import copy

import numpy as np

import pytest
import torch
from torch import nn

import esegeta
from esegeta.attribution import wrappers
from esegeta.errors import ConfigError
from esegeta.algorithms import patterns as pm
from esegeta.attribution.prepare import prepared

from conftest import SAMPLES, assert_unchanged, hook_count, snapshot


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _features(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    return seen[0], logits


# ---------------------------------------------------------------------------- CAM

def test_cam_is_the_weighted_feature_sum_and_gradcam_times_positions(digits):
    """CAM_c = Σ_k w_ck A_k; its spatial mean plus b_c is the logit; Grad-CAM without ReLU is CAM/(h·w)."""
    from captum.attr import LayerGradCam

    before = snapshot(digits.model)
    cam = esegeta.explain(digits.model, digits.x, "esegeta.CAM", target=3, layer="layer2")
    features, logits = _features(copy.deepcopy(digits.model), digits.x, "layer2")
    fc = digits.model.fc
    expected = torch.einsum("bkhw,k->bhw", features, fc.weight[3].detach()).unsqueeze(1)
    assert cam.shape == (1, 1, 4, 4)
    assert torch.allclose(cam, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(cam.mean() + fc.bias[3], logits[0, 3], rtol=1e-5, atol=1e-5)

    model = copy.deepcopy(digits.model)
    gradcam = LayerGradCam(model, model.layer2).attribute(digits.x, target=3, relu_attributions=False)
    h, w = features.shape[2:]
    assert torch.allclose(cam, gradcam * (h * w), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cam, gradcam, rtol=0.1)  # the factor h·w = 16 matters
    assert_unchanged(digits.model, before)


def test_cam_targets_per_input(digits):
    x = torch.cat([digits.x, digits.x.flip(-1)])
    cam = esegeta.explain(digits.model, x, "esegeta.CAM", target="predicted", layer="layer2")
    predicted = digits.model(x).argmax(1)
    for i in range(2):
        assert torch.allclose(cam[i:i + 1], esegeta.explain(digits.model, x[i:i + 1], "esegeta.CAM",
                                                            target=int(predicted[i]), layer="layer2"))


def test_cam_names_the_feature_layer_when_another_is_given(digits):
    with pytest.raises(ConfigError, match="use layer 'layer2'") as info:
        esegeta.explain(digits.model, digits.x, "esegeta.CAM", target=3, layer="layer1")
    assert info.value.path == "layer"


def test_cam_refuses_a_model_without_gap_linear_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    with pytest.raises(ConfigError, match="GAP→linear head|captum.LayerGradCam"):
        esegeta.explain(model, torch.rand(1, 1, 8, 8), "esegeta.CAM", target=1, layer="1")
    headless = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(ConfigError, match="not a linear layer's output"):
        esegeta.explain(headless, torch.rand(1, 1, 8, 8), "esegeta.CAM", target=1, layer="0")


# ---------------------------------------------------------------------------- PatternNet / PatternAttribution

def _signal_and_distractor(n: int = 4000, dim: int = 6, seed: int = 0):
    """x = a_s·s + a_d·d (+ small noise), and the least-squares filter w recovering s from x."""
    g = torch.Generator().manual_seed(seed)
    a_s = torch.randn(dim, generator=g, dtype=torch.float64)
    a_d = a_s + 0.8 * torch.randn(dim, generator=g, dtype=torch.float64)  # a distractor close to the signal
    s = torch.randn(n, generator=g, dtype=torch.float64)
    d = 2.0 * torch.randn(n, generator=g, dtype=torch.float64)
    x = s[:, None] * a_s + d[:, None] * a_d + 0.05 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    w = torch.linalg.lstsq(x, s[:, None]).solution[:, 0]
    model = nn.Sequential(nn.Flatten(), nn.Linear(dim, 1, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(w.float()[None])
    return model, x.float()[:, None, :], a_s.float(), s.float(), w.float()


@pytest.mark.parametrize("pattern_type", ["relu", "linear"])
def test_patterns_recover_the_signal_direction_where_the_filter_does_not(tmp_path, pattern_type):
    """Kindermans et al. §2: w must cancel the distractor, so it is not aligned with a_s; the pattern is."""
    model, x, a_s, s, w = _signal_and_distractor()
    file = tmp_path / "linear.pt"
    explained = x[:50]
    signal = esegeta.explain(model, explained, "esegeta.PatternNet", target=0, fit_inputs=x, patterns=str(file),
                             pattern_type=pattern_type)
    a = torch.load(file, weights_only=True)["patterns"]["1"][0]
    y = model(explained).detach()[:, 0]
    cos_pattern, cos_filter = _cos(a, a_s), _cos(w, a_s)
    print(f"\n{pattern_type}: cos(pattern, a_s) = {cos_pattern:.5f}; cos(w, a_s) = {cos_filter:.5f}")
    assert cos_pattern > 0.99 and abs(cos_filter) < 0.9
    assert torch.allclose(w @ a, torch.tensor(1.0), atol=1e-4)  # wᵀa = 1 by construction

    # PatternNet backprojects y along the pattern: the estimated signal a·y points along a_s·s.
    true_signal = s[:50, None] * a_s
    assert torch.allclose(signal[:, 0], y[:, None] * a[None], rtol=1e-4, atol=1e-5)
    cos_net, cos_grad = _cos(signal, true_signal), _cos(y[:, None] * w[None], true_signal)
    # PatternAttribution is w ⊙ a·y: the signal's contribution to the output, summing to y.
    attribution = esegeta.explain(model, explained, "esegeta.PatternAttribution", target=0, patterns=str(file),
                                  pattern_type=pattern_type)
    assert torch.allclose(attribution[:, 0], y[:, None] * (w * a)[None], rtol=1e-4, atol=1e-5)
    assert torch.allclose(attribution.sum((1, 2)), y, rtol=1e-3, atol=1e-4)
    cos_attr = _cos(attribution, w * true_signal)
    cos_ixg = _cos(explained[:, 0] * w, w * true_signal)
    print(f"{pattern_type}: cos(PatternNet, a_s·s) = {cos_net:.5f}; cos(gradient·y, a_s·s) = {cos_grad:.5f}; "
          f"cos(PatternAttribution, w⊙a_s·s) = {cos_attr:.5f}; cos(input×gradient, w⊙a_s·s) = {cos_ixg:.5f}")
    assert cos_net > 0.99 and cos_grad < 0.9
    assert cos_attr > 0.99 and cos_ixg < 0.9


def test_fitted_patterns_match_the_estimator_on_the_digits_network(digits):
    """The fitted pattern of the dense head and of the stem conv (batch norm folded) equal the formula
    a = (E+[x y] − E+[x] E[y]) / wᵀ(…), computed here directly from unfolded inputs."""
    xs = torch.cat([torch.from_numpy(np.load(p)).float()[None] for p in sorted((SAMPLES / "data/digits").glob("*.npy"))])
    xs = torch.cat([xs, xs.flip(-1), xs.flip(-2), xs.transpose(-1, -2)])  # 16 inputs
    net = prepared(digits.model, xs)
    found = pm.kernels(net, xs[:1], "test")
    assert [k.name for k in found][:2] == ["stem.0", "layer1.conv1"] and found[-1].name == "fc"
    assert found[0].norm is net.model.stem[1] and found[-1].norm is None
    patterns = pm.fit(net, found, iter([xs]), "relu")

    def estimator(x2d, w2d, bias):  # x2d: (samples, inputs), w2d: (outputs, inputs)
        x2d, w2d = x2d.double(), w2d.double()
        y = x2d @ w2d.T
        mask = (y + bias.double() > 0).double()
        count = mask.sum(0).clamp_min(1)
        cov = (x2d.T @ (y * mask)) / count - (x2d.T @ mask) / count * y.mean(0)
        return (cov / (w2d * cov.T).sum(1)).T

    fc_in, _ = _features(net, xs, "model.pool")
    fc = net.model.fc
    expected_fc = estimator(fc_in.flatten(1), fc.weight.detach(), fc.bias.detach())
    assert torch.allclose(patterns["fc"].double(), expected_fc, rtol=1e-4, atol=1e-6)

    stem = found[0]
    w = stem.weight()  # folded with the batch norm
    unfolded = torch.nn.functional.unfold(xs, 3, padding=1).transpose(1, 2).reshape(-1, 9)
    expected_stem = estimator(unfolded, w.reshape(16, -1), stem.bias()).reshape(w.shape)
    assert torch.allclose(patterns["stem.0"].double(), expected_stem, rtol=1e-4, atol=1e-6)
    bn = net.model.stem[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(w, net.model.stem[0].weight * scale[:, None, None, None])


@pytest.mark.parametrize("name", ["digits", "retina", "tissue"])
def test_pattern_backward_with_the_weights_as_patterns_is_the_gradient(name, request, tmp_path):
    """PatternNet with a = the (batch-norm folded) weights backpropagates the gradient; doubling the first
    layer's (a bottleneck) doubles it, so the hooks must be in place. Checks the folding, the ReLU gating
    and, on the U-Nets, transposed convolutions, skip connections and the wrapper. PatternAttribution with
    a = 1 (backward weight w ⊙ 1) is the gradient too."""
    case = request.getfixturevalue(name)
    net = prepared(case.model, case.x)
    found = pm.kernels(net, case.x, "test")
    doubled, ones = tmp_path / "doubled.pt", tmp_path / "ones.pt"
    torch.save({"pattern_type": "relu", "patterns": {k.name: k.weight() * (2 if i == 0 else 1)
                                                     for i, k in enumerate(found)}}, doubled)
    torch.save({"pattern_type": "relu", "patterns": {k.name: torch.ones_like(k.module.weight) for k in found}}, ones)
    before = snapshot(case.model)
    signal = esegeta.explain(case.model, case.x, "esegeta.PatternNet", target=case.target, wrapper=case.wrapper,
                             patterns=str(doubled))
    attribution = esegeta.explain(case.model, case.x, "esegeta.PatternAttribution", target=case.target,
                                  wrapper=case.wrapper, patterns=str(ones))
    gradient = esegeta.explain(case.model, case.x, "captum.Saliency", target=case.target, wrapper=case.wrapper,
                               abs=False)
    forward = net if case.wrapper is None else wrappers.build(net, case.x, case.wrapper, None)
    expected = forward(case.x)[0, case.target].detach() * gradient
    tolerance = 1e-5 * float(expected.abs().max())
    assert torch.allclose(signal, 2 * expected, rtol=1e-4, atol=2 * tolerance)
    assert torch.allclose(attribution, expected, rtol=1e-4, atol=tolerance)
    assert expected.abs().sum() > 0
    assert_unchanged(case.model, before)
    assert hook_count(net) == 0


def test_transposed_convolution_patterns_match_the_estimator():
    """ConvTranspose2d(k=2, s=2): output (2i+p, 2j+q) of channel o sees x[:, i, j] through W[:, o, p, q];
    the pattern is cov = E+[x y] − E+[x] E[y] over all output positions of o, divided by wᵀcov."""
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(3, 4, 2, stride=2).eval()
    model = nn.Sequential(up, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(6, 3, 5, 5)
    found = pm.kernels(model, x[:1], "test")
    pattern = pm.fit(model, found, iter([x]), "relu")["0"].double()

    w = up.weight.detach().double()  # (in, out, p, q)
    y = torch.einsum("bcij,copq->boipjq", x.double(), w)  # without bias; output (2i+p, 2j+q)
    mask = (y + up.bias.detach().double()[None, :, None, None, None, None] > 0).double()
    count = mask.sum((0, 2, 3, 4, 5))
    mean_y = y.mean((0, 2, 3, 4, 5))
    e_xy = torch.einsum("bcij,boipjq->copq", x.double(), y * mask) / count[None, :, None, None]
    e_x = torch.einsum("bcij,boipjq->copq", x.double(), mask) / count[None, :, None, None]
    cov = e_xy - e_x * mean_y[None, :, None, None]
    expected = cov / (w * cov).sum((0, 2, 3))[None, :, None, None]
    assert torch.allclose(pattern, expected, rtol=1e-4, atol=1e-6)


def test_bottlenecks_are_where_all_paths_pass(digits, retina):
    """Projection points: on the ResNet the stem and the head (residual blocks have two paths), on the U-Net
    the first and last convolutions (the skip connections bypass the middle)."""
    expected = {"digits": ["stem.0", "fc"], "retina2d": ["enc1.0", "enc1.3", "dec1.0", "dec1.3", "head"]}
    for case in (digits, retina):
        net = prepared(case.model, case.x)
        found = pm.kernels(net, case.x, "test")
        outputs: list = []
        x = case.x.clone().requires_grad_(True)
        with pm.backward_weights(found, {k.name: k.weight() for k in found}, outputs):
            score = net(x).sum()
        names = [k.name for k, t in zip(found, outputs) if any(t is b for b in pm._bottlenecks(score, x, outputs))]
        assert names == expected[case.name]
        assert hook_count(net) == 0


@pytest.mark.parametrize("method", ["esegeta.PatternNet", "esegeta.PatternAttribution"])
def test_projection_changes_only_the_scale(retina, method):
    """project_bottlenecks rescales each sample's signal by a positive factor: raw = c · projected."""
    fit = torch.cat([retina.x, retina.x.flip(-1), retina.x.flip(-2)])
    raw = esegeta.explain(retina.model, retina.x, method, target=1, wrapper=retina.wrapper, fit_inputs=fit)
    projected = esegeta.explain(retina.model, retina.x, method, target=1, wrapper=retina.wrapper, fit_inputs=fit,
                                project_bottlenecks=True)
    factor = (raw * projected).sum() / (projected * projected).sum()
    assert factor > 1 and torch.allclose(raw, factor * projected, rtol=1e-3, atol=1e-4 * float(raw.abs().max()))
    assert _cos(raw, projected) > 0.99999


def test_patterns_from_files_are_saved_and_reused(digits, tmp_path):
    file = tmp_path / "sub" / "digits_patterns.pt"
    glob = str(SAMPLES / "data" / "digits" / "*.npy")
    first = esegeta.explain(digits.model, digits.x, "esegeta.PatternNet", target=3, fit_inputs=[glob],
                            patterns=str(file))
    assert file.is_file() and torch.isfinite(first).all() and first.abs().sum() > 0
    stamp = file.stat().st_mtime_ns
    again = esegeta.explain(digits.model, digits.x, "esegeta.PatternNet", target=3, patterns=str(file))
    assert torch.equal(first, again) and file.stat().st_mtime_ns == stamp
    other = esegeta.explain(digits.model, digits.x, "esegeta.PatternNet", target=3, fit_inputs={"paths": [glob]})
    assert torch.allclose(first, other)
    with pytest.raises(ConfigError, match="pattern_type") as info:
        esegeta.explain(digits.model, digits.x, "esegeta.PatternNet", target=3, patterns=str(file),
                        pattern_type="linear")
    assert info.value.path == "params.patterns"


def test_a_patterns_file_of_another_model_is_refused(digits, retina, tmp_path):
    file = tmp_path / "retina.pt"
    esegeta.explain(retina.model, retina.x, "esegeta.PatternNet", target=1, wrapper=retina.wrapper,
                    patterns=str(file))
    with pytest.raises(ConfigError, match="another model") as info:
        esegeta.explain(digits.model, digits.x, "esegeta.PatternNet", target=3, patterns=str(file))
    assert info.value.path == "params.patterns"


@pytest.mark.parametrize("name,value,message", [
    ("fit_inputs", 5, "'samples'"), ("pattern_type", "two_component", "'relu'"), ("patterns", "p.npy", ".pt"),
    ("batch_size", 0, ">= 1"), ("project_bottlenecks", "yes", "true or false"),
])
def test_bad_pattern_params_name_the_fix(digits, name, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        esegeta.explain(digits.model, digits.x, "esegeta.PatternNet", target=3, **{name: value})
    assert info.value.path == f"explain.params.{name}"


def test_hooks_are_removed_when_the_backward_fails(digits):
    net = prepared(digits.model, digits.x)
    with pytest.raises(RuntimeError):
        esegeta.explain(digits.model, digits.x, "esegeta.PatternNet", target=10)  # no column 10
    assert hook_count(net) == 0


def test_unsupported_layers_are_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.rand(1, 1, 6, 6))
    with pytest.raises(ConfigError, match="GroupNorm"):
        esegeta.explain(model.eval(), torch.rand(2, 1, 6, 6), "esegeta.PatternNet", target=0)


# ---------------------------------------------------------------------------- guided backprop of a channel

def test_layer_activation_guided_backprop_is_captums_with_a_channel_mean_selector(digits):
    """Same as captum.NeuronGuidedBackprop with the channel-mean selector on the prepared copy, and as
    captum.GuidedBackprop of a truncated network whose outputs are the layer's channel means."""
    from captum.attr import GuidedBackprop, NeuronGuidedBackprop

    result = esegeta.explain(digits.model, digits.x, "esegeta.LayerActivationGuidedBackprop", layer="layer2",
                             channel=5)
    net = prepared(digits.model, digits.x)
    direct = NeuronGuidedBackprop(net, net.layer("layer2")).attribute(
        digits.x, neuron_selector=lambda out: out[:, 5].mean((1, 2)))
    assert torch.equal(result, direct)

    class ChannelMeans(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            out = self.m.layer2(self.m.layer1(self.m.relu(self.m.stem(x))))
            return out.mean((2, 3))

    truncated = ChannelMeans(net.model)
    definition = GuidedBackprop(truncated).attribute(digits.x, target=5)
    assert torch.allclose(result, definition, rtol=1e-5, atol=1e-7)
    assert result.abs().sum() > 0

    auto = esegeta.explain(digits.model, digits.x, "esegeta.LayerActivationGuidedBackprop", layer="layer2")
    features, _ = _features(digits.model, digits.x, "layer2")
    best = int(features.mean((2, 3)).argmax())
    assert torch.equal(auto, esegeta.explain(digits.model, digits.x, "esegeta.LayerActivationGuidedBackprop",
                                             layer="layer2", channel=best))
    with pytest.raises(ConfigError, match="32 channels"):
        esegeta.explain(digits.model, digits.x, "esegeta.LayerActivationGuidedBackprop", layer="layer2", channel=32)


# ---------------------------------------------------------------------------- from a JSON config

def test_own_methods_run_from_a_config_with_paths_relative_to_it(tmp_path, digits):
    from esegeta import Pipeline

    (tmp_path / "samples").symlink_to(SAMPLES, target_is_directory=True)
    cfg = {
        "model": {"factory": "samples/models.py:DigitResNet", "weights": "samples/checkpoints/digit_resnet.pt"},
        "inputs": {"paths": ["samples/data/digits"], "spatial_dims": 2},
        "target": "predicted",
        "runtime": {"devices": "cpu", "seed": 0},
        "output": {"dir": "out", "formats": ["npy"]},
        "methods": [
            {"id": "esegeta.CAM", "layer": "layer2"},
            {"id": "esegeta.PatternNet", "params": {"patterns": "patterns/from_samples.pt"}},
            {"id": "esegeta.PatternAttribution",
             "params": {"fit_inputs": ["samples/data/digits/*.npy"], "patterns": "patterns/from_files.pt"}},
            {"id": "esegeta.LayerActivationGuidedBackprop", "layer": "layer2", "params": {"channel": 1}},
        ],
    }
    result = Pipeline(cfg, base_dir=tmp_path).run()
    assert result.exit_code == 0, [r["error"] for r in result.runs]
    assert (tmp_path / "patterns" / "from_samples.pt").is_file() and (tmp_path / "patterns" / "from_files.pt").is_file()
    all_inputs = torch.cat([torch.from_numpy(np.load(p)).float()[None]
                            for p in sorted((SAMPLES / "data" / "digits").glob("*.npy"))])
    for method, shape in [("esegeta.CAM", (1, 4, 4)), ("esegeta.PatternNet", (1, 8, 8)),
                          ("esegeta.PatternAttribution", (1, 8, 8))]:
        saved = torch.from_numpy(result.result(method, "digit_30_label3"))
        assert saved.shape == shape
        kwargs = {"layer": "layer2"} if method == "esegeta.CAM" else {"fit_inputs": all_inputs}
        direct = esegeta.explain(digits.model, digits.x, method, target="predicted", **kwargs)[0]
        assert torch.allclose(saved, direct, rtol=1e-4, atol=1e-6), method


def test_unknown_params_get_a_hint():
    from esegeta.spec.params import check_method

    with pytest.raises(ConfigError, match="did you mean pattern_type"):
        check_method("esegeta.PatternNet", {"pattern_typ": "relu"}, None, None, "methods[0]")
    with pytest.raises(ConfigError, match="needs a 'layer'"):
        check_method("esegeta.CAM", {}, None, None, "methods[0]")
    with pytest.raises(ConfigError, match="noise tunnel"):
        check_method("esegeta.PatternNet", {}, None, {"nt_samples": 2}, "methods[0]")
