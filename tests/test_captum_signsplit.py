"""Captum's LRP with ``params.conv_rule`` (esegeta.attribution.rules.SignSplit): z⁺ or γ on convolutions.

- Conservation: Σ relevance ÷ score within 0.02 (bias-free: biases and the like zeroed, so the rules
  alone are measured; the issue's UNet with its biases too) on the issue's MONAI UNet 3D, SwinUNETR,
  SegResNet and a DenseNet-like net (concatenations, GroupNorm, PReLU). With Captum's ε rule on
  every convolution (the previous default) these were −10, −2.3e5, 1.00 and far off.
- Cross-library: Captum's LRP with z⁺ on the convolutions (ε on dense layers) equals zennit's
  ``EpsilonPlus`` on the same model (same substitutes for the norms), and with γ zennit's ``Gamma``;
  so the adapter computes a published rule, not a rule of its own.
- The layer's output is its own, bit for bit; the user's model is untouched; the substitutes are
  gone afterwards, also on error; "auto" keeps plain ReLU CNNs equal to Captum's upstream call.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import esegeta
import zoo_models
from conftest import assert_unchanged, hook_count, snapshot
from esegeta.attribution.prepare import prepared
from esegeta.attribution.rules import CONVOLUTIONS, SignSplit, sign_split
from esegeta.errors import ConfigError
from test_rules import _ratio, _score, bias_free, issue_unet, model


def _explain(z, method, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return esegeta.explain(z.model, z.x, method, target=z.target, wrapper=z.wrapper, **params)


class DenseLike(nn.Module):
    """A DenseNet-like block on GroupNorm and PReLU: each layer reads the concatenation of all before."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layers = nn.ModuleList(nn.Sequential(nn.GroupNorm(2, 4 * (i + 1)), nn.PReLU(), nn.Conv2d(4 * (i + 1), 4, 3,
                                                                                                    padding=1))
                                    for i in range(3))
        self.norm = nn.GroupNorm(4, 16)
        self.head = nn.Linear(16 * 8 * 8, 3)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.head(self.norm(torch.cat(features, 1)).flatten(1))


def dense_like() -> zoo_models.ZooModel:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # an image of mixed sign
    return zoo_models.ZooModel("dense_like", DenseLike().eval(), x, "layers.1", "layers.1.2", target=0)


def small_convnet() -> zoo_models.ZooModel:
    """Convolutions on inputs of mixed sign (the image, a GroupNorm's output, a LeakyReLU's) and a dense head."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.LeakyReLU(0.1),
                        nn.Conv2d(6, 4, 3, stride=2, padding=1), nn.ConvTranspose2d(4, 4, 2, stride=2),
                        nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    return zoo_models.ZooModel("small_convnet", net, torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)),
                               "3", "3", target=1)


CASES = {"issue_unet": issue_unet, "swinunetr": lambda: model("swinunetr"), "segresnet": lambda: model("segresnet"),
         "dense_like": dense_like}


@pytest.mark.parametrize("name", CASES)
def test_captum_lrp_conserves_by_default_on_normalised_nets(name):
    z = bias_free(CASES[name]())
    before = snapshot(z.model)
    assert abs(_ratio(z, "captum.LRP") - 1) <= 0.02  # "auto": γ on the convolutions of these models
    # z⁺ drops the relevance of outputs whose z⁺ is 0 (0.48 on SegResNet, 0.65 on SwinUNETR, as zennit's
    # EpsilonPlus), but never makes any
    assert 0.3 <= _ratio(z, "captum.LRP", conv_rule="zplus") <= 1.02
    assert_unchanged(z.model, before)
    assert hook_count(prepared(z.model, z.x)) == 0
    assert not any(isinstance(m, SignSplit) for m in prepared(z.model, z.x).modules())


def test_captum_lrp_conserves_on_the_issue_unet_with_its_biases():
    """With biases, the ε rule let each convolution's bias take relevance: 7.9e8× the score;
    the γ rule leaves the bias out of its denominators, and the norms pass relevance on."""
    z = issue_unet()
    assert abs(_ratio(z, "captum.LRP", conv_rule="epsilon")) > 1e3
    assert abs(_ratio(z, "captum.LRP") - 1) <= 0.02


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("make", (small_convnet, lambda: model("unet3d")), ids=("convnet", "monai_unet3d"))
def test_zplus_and_gamma_equal_zennits_rules(make):
    """Captum's LRP (its attribution ÷ the score: Captum's seed is the score, zennit's 1) with z⁺ on
    the convolutions equals zennit's EpsilonPlus; with γ, EpsilonPlus whose convolutions take zennit's
    Gamma (γ 0.25); zennit's ε and stabiliser set to Captum's 1e-9 (at zennit's 1e-6: 7e-5 apart)."""
    z = bias_free(make())
    score = _score(z, z.x)
    conv_types = {type(m).__name__ for m in z.model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d,
                                                                                  nn.ConvTranspose3d))}
    gamma_map = {name: {"rule": "gamma", "gamma": 0.25, "stabilizer": 1e-9} for name in conv_types}
    for rule, params in (("zplus", {}), ("gamma", {"layer_map": gamma_map})):
        captum = _explain(z, "captum.LRP", conv_rule=rule).double() / score
        zennit = _explain(z, "zennit.EpsilonPlus", epsilon=1e-9, stabilizer=1e-9, **params).double()
        assert _relative(captum, zennit) <= 1e-5, (rule, _relative(captum, zennit))  # measured: 5e-8 to 2e-7
        assert abs(float(captum.sum()) - 1) <= 0.05 or rule == "zplus"


def test_forward_values_are_the_layers_own_and_the_swaps_are_undone_also_on_error():
    z = model("unet3d")
    ready = prepared(z.model, z.x)
    convs = [(n, m) for n, m in ready.named_modules() if isinstance(m, CONVOLUTIONS)]
    x = z.x.clone().requires_grad_()
    with torch.no_grad():
        expected = ready(x)
    for rule in ("zplus", "gamma"):
        with sign_split(ready, x, rule) as changes:
            assert changes and sum(isinstance(m, SignSplit) for m in ready.modules()) == len(convs)
            assert torch.equal(ready(x), expected)
    with pytest.raises(RuntimeError, match="half-way"):
        with sign_split(ready, x, "gamma"):
            raise RuntimeError("a failure half-way")
    assert [(n, m) for n, m in ready.named_modules() if isinstance(m, CONVOLUTIONS)] == convs
    assert not any(isinstance(m, SignSplit) for m in ready.modules())


def test_auto_keeps_plain_relu_cnns_equal_to_captum_and_is_recorded():
    from esegeta.attribution.explainer import run
    from esegeta.spec.request import from_arguments

    resnet = model("resnet18")
    assert torch.equal(_explain(resnet, "captum.LRP"), _explain(resnet, "captum.LRP", conv_rule="epsilon"))
    for z, said in ((resnet, "auto → epsilon"), (model("unet2d"), "auto → gamma")):
        request = from_arguments("captum.LRP", target=z.target, wrapper=z.wrapper, layer=None, noise_tunnel=None,
                                 patch=None, params={})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = run(request, prepared(z.model, z.x), z.x, samples=z.x, with_scores=True)
        assert dict(outcome.checks[0].rules)["conv_rule"] == said


def test_conv_rule_is_checked_and_layer_lrp_keeps_its_layer():
    z = model("unet2d")
    with pytest.raises(ConfigError, match="conv_rule"):
        _explain(z, "captum.LRP", conv_rule="z+")
    with pytest.raises(ConfigError, match="conv_rule"):
        _explain(z, "zennit.EpsilonPlus", conv_rule="gamma")  # Captum's parameter only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = esegeta.explain(z.model, z.x, "captum.LayerLRP", target=z.target, wrapper=z.wrapper, layer=z.leaf_layer)
    assert torch.isfinite(layer).all() and layer.abs().sum() > 0


@pytest.mark.parametrize("name", ("resnet18", "densenet121"))
def test_gamma_and_split_make_plain_relu_cnns_add_up(name):
    """Plain ReLU CNNs stay upstream by default; asked for, γ on the convolutions, BatchNorms passing
    relevance on (their shift took it under ε: ResNet-18 256 with split branches alone) and DenseNet's
    functional average pooling with the ε rule (its ReLU dropped the inactive units' share: 0.53) make
    them add up, bias-free: ResNet-18 7.2e14 → 1.00, DenseNet-121 33 → 1.00."""
    z = bias_free(model(name))
    before = snapshot(z.model)
    assert abs(_ratio(z, "captum.LRP", conv_rule="gamma", branches="split") - 1) <= 0.02
    assert_unchanged(z.model, before)
    ready = prepared(z.model, z.x)
    assert hook_count(ready) == 0 and not any("forward" in vars(m) for m in ready.modules())


def test_the_warning_names_the_likely_cause_first():
    """Far off (7.9e8× the score with ε on the issue's UNet's convolutions), the cause named first is the
    rule whose terms grow and cancel, with its fix; the warning stays short (it listed five causes at length)."""
    from esegeta.attribution.explainer import AxiomWarning

    z = issue_unet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        esegeta.explain(z.model, z.x, "captum.LRP", target=z.target, wrapper=z.wrapper, conv_rule="epsilon")
    said = [str(w.message) for w in caught if issubclass(w.category, AxiomWarning)]
    assert said and "likely Captum's ε on convolutions" in said[0] and 'params.conv_rule to "gamma"' in said[0]
    assert len(said[0]) <= 480


def test_gamma_on_the_dense_layers_is_the_generalised_rule():
    """``params.gamma`` gave Captum's own ``GammaRule``, which assumes inputs ≥ 0: on a transformer's
    mixed-sign activations it made ViT-B/16's Σ ÷ score −1.4e8 (bias-free; ε: −743). It is now zennit's
    generalised γ, as on the convolutions: 0.98 there; on an 8-block ViT, bias-free, within 0.05."""
    z = bias_free(zoo_models.vit8())
    assert abs(_ratio(z, "captum.LRP", gamma=0.25) - 1) <= 0.05


class MixedNet(nn.Module):
    """Every layer the rules touch: convolutions (transposed too), GroupNorm, BatchNorm, a functional
    average pooling and a dense head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                                  nn.BatchNorm2d(4), nn.ReLU(), nn.ConvTranspose2d(4, 4, 2, stride=2))
        self.head = nn.Linear(4, 3)
        with torch.no_grad():  # running statistics with a shift (taken for a bias under ε)
            self.body[3].running_mean.uniform_(-1, 1, generator=torch.Generator().manual_seed(3))

    def forward(self, x):
        return self.head(torch.nn.functional.adaptive_avg_pool2d(self.body(x), 1).flatten(1))


def test_the_rules_run_on_meta():
    """Every tensor the rules make follows the data's device (here ``meta``: values-free, and mixing
    a CPU tensor in raises as CUDA would)."""
    net = MixedNet().eval().to("meta")
    x = torch.empty(1, 3, 8, 8, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for params in ({}, {"conv_rule": "zplus"}, {"conv_rule": "gamma", "branches": "split", "gamma": 0.25}):
            attr = esegeta.explain(net, x, "captum.LRP", target=0, **params)
            assert attr.device.type == "meta" and attr.shape == x.shape


def test_mixed_net_adds_up_with_every_rule_asked_for():
    z = bias_free(zoo_models.ZooModel("mixed", MixedNet().eval(), torch.randn(1, 3, 8, 8), "body", "body.0"))
    assert abs(_ratio(z, "captum.LRP", conv_rule="gamma", branches="split", gamma=0.25) - 1) <= 0.02


class SizedUp(nn.Module):
    """A transposed convolution called with an output size (its output padding follows from it)."""

    def __init__(self):
        super().__init__()
        self.down, self.norm = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.GroupNorm(2, 4)
        self.up, self.head = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1), nn.Linear(2 * 8 * 8, 3)

    def forward(self, x):
        return self.head(self.up(self.norm(self.down(x)), output_size=x.shape[2:]).flatten(1))


def test_a_transposed_convolution_called_with_an_output_size():
    torch.manual_seed(0)
    z = bias_free(zoo_models.ZooModel("sized_up", SizedUp().eval(), torch.randn(1, 3, 8, 8), "up", "up"))
    assert abs(_ratio(z, "captum.LRP") - 1) <= 0.02
