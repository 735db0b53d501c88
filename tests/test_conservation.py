"""Conservation per result: LRP's relevance and DeepLIFT's/IG's attributions against what they
explain, stated by ``explain`` (warnings, errors) and by each run record."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import esegeta
from esegeta.attribution.explainer import AxiomWarning
from esegeta.errors import NonFiniteResult


class BiasFreeSegmenter(nn.Module):
    """conv-ReLU-conv without biases or normalisation: LRP's ε rule conserves relevance exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.c2 = nn.Conv2d(6, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.c2.weight.abs_()  # a positive output where the input is positive: pixels to explain

    def forward(self, x):
        return self.c2(self.relu(self.c1(x)))


WRAPPER = {"name": "threshold", "channel": 0, "threshold": 0.0, "activation": "none"}


def _explain(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = esegeta.explain(*args, **kwargs)
    return result, [w for w in caught if issubclass(w.category, AxiomWarning)]


@pytest.mark.parametrize("method, seed", [("captum.LRP", "score"), ("zennit.EpsilonPlus", "one")])
def test_lrp_of_a_wrapped_segmenter_adds_up_to_the_score(method, seed):
    """The wrapper's masked sum takes the ε rule: relevance sums to the explained score (Captum)
    or to zennit's seed of 1, not to them times the mask's pixel count (the demo's 7,000×)."""
    model = BiasFreeSegmenter().eval()
    x = torch.rand(1, 3, 16, 16)
    wrapped_score = float(model(x).detach().clamp_min(0).sum())
    relevance, axiom = _explain(model, x, method, target=1, wrapper=WRAPPER)
    expected = wrapped_score if seed == "score" else 1.0
    assert float(relevance.sum()) == pytest.approx(expected, rel=1e-3)
    assert not axiom


def test_demo_lrp_is_no_longer_thousands_of_times_its_score(retina):
    """On the demo's model (BatchNorm, biases, a sigmoid wrapper) Captum's LRP was ~7,000× its
    score; now within a few times, and the warning names the causes left (bias absorption)."""
    relevance, axiom = _explain(retina.model, retina.x, "captum.LRP", target=1, wrapper=retina.wrapper)
    record_score = esegeta.attribution.wrappers.build(retina.model, retina.x, retina.wrapper).unperturbed[0, 1]
    ratio = float(relevance.sum()) / float(record_score)
    assert 0.1 < abs(ratio) < 10
    if abs(ratio - 1) > 0.05:
        assert axiom and "bias absorption" in str(axiom[0].message) and "sigmoid" in str(axiom[0].message)


def test_zennit_without_biases_conserves_on_the_demo_model(retina):
    """The fix the warning names for bias absorption: zennit's EpsilonPlus with biases left out
    (``zero_params: "bias"``, as configs/retina.json runs it) adds up to its seed within tolerance."""
    relevance, axiom = _explain(retina.model, retina.x, "zennit.EpsilonPlus", target=1, wrapper=retina.wrapper,
                                zero_params="bias")
    assert float(relevance.sum()) == pytest.approx(1.0, abs=0.05)
    assert not axiom
    _, biased = _explain(retina.model, retina.x, "zennit.EpsilonPlus", target=1, wrapper=retina.wrapper)
    assert biased and 'zero_params to "bias"' in str(biased[0].message)


def test_deeplift_and_ig_records_state_the_sum(digits, tmp_path):
    """Each record of an axiom method carries Σ attribution, f(x) − f(baseline), their ratio and
    the tolerance; a method without an axiom carries none."""
    config = {"model": {"factory": "samples/models.py:DigitResNet", "weights": "samples/checkpoints/digit_resnet.pt"},
              "inputs": {"paths": ["samples/data/digits/digit_30_label3.npy"], "spatial_dims": 2},
              "target": 3, "output": {"dir": str(tmp_path / "run"), "formats": ["npy"]},
              "methods": [{"id": "captum.DeepLift"}, {"id": "captum.IntegratedGradients", "params": {"n_steps": 64}},
                          {"id": "captum.Saliency"}]}
    from pathlib import Path

    result = esegeta.Pipeline(config, base_dir=Path(__file__).resolve().parent.parent).run()
    records = {r["method"]: r for r in result.runs}
    for method, axiom in (("captum.DeepLift", "summation-to-delta"), ("captum.IntegratedGradients", "completeness")):
        check = records[method]["conservation"]
        assert check["axiom"] == axiom and check["of"] == "f(x) - f(baseline)"
        assert check["ratio"] == pytest.approx(1.0, abs=check["tolerance"]) and check["holds"] is True
        attribution = torch.from_numpy(result.result(method, "digit_30_label3"))
        assert float(attribution.sum()) == pytest.approx(check["sum"], rel=1e-4)
    assert "conservation" not in records["captum.Saliency"]
    assert "summation-to-delta" in (tmp_path / "run" / "report.html").read_text()  # the report shows it


def test_completeness_off_warns_with_the_fix(digits):
    """Too few IG steps: completeness does not hold, and the warning says to raise n_steps."""
    _, axiom = _explain(digits.model, digits.x, "captum.IntegratedGradients", target=3, n_steps=2,
                        method="riemann_left")
    assert axiom and "raise n_steps" in str(axiom[0].message)


class NaNWhereNegative(nn.Module):
    """A model whose output is NaN where its convolution is negative (a log of it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        return torch.log(self.conv(x)).mean(dim=(2, 3))


def test_explain_never_returns_non_finite_numbers(digits):
    """A NaN result raises esegeta's error naming where it came from: the input, the model's output."""
    x = digits.x.clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteResult, match="the input holds 1 NaN"):
        esegeta.explain(digits.model, x, "captum.Saliency", target=3)
    with pytest.raises(NonFiniteResult, match="model's output"):
        esegeta.explain(NaNWhereNegative(), torch.randn(1, 1, 8, 8), "captum.Saliency", target=0)


def test_lrp_on_the_issue_monai_unet_is_finite():
    """The issue's case: Captum's LRP on a freshly initialised MONAI UNet was NaN in all 32,768
    voxels, returned silently; then esegeta's error said the method overflowed (its ε rule dividing
    by InstanceNorm outputs near zero). On the substitutes (esegeta.attribution.rules) each
    InstanceNorm element keeps its relevance: the map is finite."""
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    unet = nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64), strides=(2, 2),
                     num_res_units=2).eval()
    g = torch.linspace(0, 1, 32)
    x = ((g[:, None, None] * g[None, :, None] + g[None, None, :] * 0.5) / 1.5)[None, None]
    attr = esegeta.explain(unet, x, "captum.LRP", target=1, wrapper={"name": "multiclass", "activation": "softmax"})
    assert torch.isfinite(attr).all() and attr.abs().sum() > 0


@pytest.mark.parametrize("method, layer", [("captum.DeepLiftShap", None), ("shap.DeepExplainer", None),
                                           ("captum.LayerDeepLift", "layer2"), ("captum.LayerIntegratedGradients", "layer2"),
                                           ("captum.NeuronDeepLift", "layer2")])
def test_every_delta_method_is_checked_against_its_baselines(digits, method, layer):
    """Several baselines (DeepLiftShap's default zeros and blur, DeepSHAP's background) are scored
    and averaged; layer attributions add up to the same difference; neuron methods explain a neuron,
    so they carry no check."""
    from esegeta.attribution.explainer import run
    from esegeta.attribution.prepare import prepared
    from esegeta.spec.request import from_arguments

    params = {"neuron_selector": (0, 0, 0)} if method.startswith("captum.Neuron") else {}
    request = from_arguments(method, target=3, wrapper=None, layer=layer, noise_tunnel=None, patch=None, params=params)
    outcome = run(request, prepared(digits.model, digits.x), digits.x, samples=digits.x, with_scores=True)
    check = outcome.checks[0]
    if method.startswith("captum.Neuron"):
        assert check is None
        return
    assert check.what == "f(x) - f(baseline)" and check.holds, check
    assert check.total == pytest.approx(float(outcome.result.double().sum()))
