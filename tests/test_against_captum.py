"""``esegeta.explain`` equals the direct Captum call, bit for bit where the computation is
the same, on the sample classifier and through a hand-written segmentation score."""
from __future__ import annotations

import captum.attr as ca
import numpy as np
import pytest
import torch

import esegeta



def _seed(seed=0):
    """Captum draws from torch's and numpy's generators (GradientShap picks baselines with numpy)."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def _direct(cls, model, x, *, layer=None, seed=0, **kwargs):
    _seed(seed)
    method = cls(model, layer) if layer is not None else cls(model)
    return method.attribute(x.clone(), **kwargs)


CLASSIFIER_CASES = [
    ("Saliency", {}, {}),
    ("Saliency", {"abs": False}, {"abs": False}),
    ("InputXGradient", {}, {}),
    ("IntegratedGradients", {"n_steps": 64}, {"n_steps": 64}),
    ("IntegratedGradients", {"n_steps": 16, "baselines": 0.5, "method": "riemann_trapezoid"},
     {"n_steps": 16, "baselines": 0.5, "method": "riemann_trapezoid"}),
    ("GradientShap", {"baselines": "zeros", "n_samples": 8, "stdevs": 0.1}, "zeros-8"),
    ("Occlusion", {"sliding_window_shapes": [1, 3, 3], "strides": [1, 2, 2]},
     {"sliding_window_shapes": (1, 3, 3), "strides": (1, 2, 2)}),
    ("FeatureAblation", {"feature_mask": {"grid": [2, 2]}}, "grid"),
    ("ShapleyValueSampling", {"feature_mask": {"grid": [4, 4]}, "n_samples": 3}, "grid-svs"),
    ("KernelShap", {"feature_mask": {"grid": [2, 2]}, "n_samples": 40}, "grid-ks"),
]


def _expected_kwargs(spec, x):
    grid = torch.arange(16).view(4, 4).repeat_interleave(2, 0).repeat_interleave(2, 1)[None, None]
    coarse = torch.arange(4).view(2, 2).repeat_interleave(4, 0).repeat_interleave(4, 1)[None, None]
    return {
        "zeros-8": {"baselines": torch.zeros_like(x), "n_samples": 8, "stdevs": 0.1},
        "grid": {"feature_mask": grid},
        "grid-svs": {"feature_mask": coarse, "n_samples": 3},
        "grid-ks": {"feature_mask": grid, "n_samples": 40},
    }[spec]


@pytest.mark.parametrize("name,params,direct_kwargs", CLASSIFIER_CASES)
def test_explain_equals_captum_on_classifier(digits, name, params, direct_kwargs):
    x = digits.x
    if isinstance(direct_kwargs, str):
        direct_kwargs = _expected_kwargs(direct_kwargs, x)
    _seed(0)
    ours = esegeta.explain(digits.model, x, f"captum.{name}", target=3, **params)
    theirs = _direct(getattr(ca, name), digits.model, x, target=3, **direct_kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,params", [("LayerGradCam", {}), ("LayerGradCam", {"relu_attributions": True}),
                                         ("LayerConductance", {"n_steps": 8}), ("LayerActivation", {}),
                                         ("LayerIntegratedGradients", {"n_steps": 8}),
                                         ("InternalInfluence", {"n_steps": 8})])
def test_explain_equals_captum_layer_methods(digits, name, params):
    target = None if name == "LayerActivation" else 3
    ours = esegeta.explain(digits.model, digits.x, f"captum.{name}", target=target, layer="layer2", **params)
    kwargs = dict(params, **({} if target is None else {"target": target}))
    theirs = _direct(getattr(ca, name), digits.model, digits.x, layer=digits.model.layer2, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_explain_equals_captum_noise_tunnel(digits):
    nt = {"nt_type": "smoothgrad_sq", "nt_samples": 6, "stdevs": 0.2}
    torch.manual_seed(0)
    ours = esegeta.explain(digits.model, digits.x, "captum.Saliency", target=3, noise_tunnel=nt)
    torch.manual_seed(0)
    theirs = ca.NoiseTunnel(ca.Saliency(digits.model)).attribute(digits.x.clone(), target=3, **nt)
    torch.testing.assert_close(ours, theirs)


def test_explain_equals_captum_predicted_target(digits):
    with torch.no_grad():
        predicted = int(digits.model(digits.x).argmax())
    ours = esegeta.explain(digits.model, digits.x, "captum.Saliency", target="predicted")
    theirs = ca.Saliency(digits.model).attribute(digits.x.clone(), target=predicted)
    torch.testing.assert_close(ours, theirs)


def test_deeplift_equals_captum_on_a_hand_fixed_model(digits):
    """On a copy whose reused ReLUs are split by hand, Captum's DeepLift equals ours."""
    import copy

    from torch import nn

    class Split(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.sites = nn.ModuleList(nn.ReLU() for _ in range(n))
            self.k = 0

        def forward(self, x):
            out = self.sites[self.k % len(self.sites)](x)
            self.k += 1
            return out

    fixed = copy.deepcopy(digits.model)
    fixed.relu = nn.ReLU()
    fixed.layer1.relu, fixed.layer2.relu = Split(2), Split(2)

    def forward(x):
        fixed.layer1.relu.k = fixed.layer2.relu.k = 0
        return fixed(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = fixed

        def forward(self, x):
            return forward(x)

    theirs = ca.DeepLift(Model()).attribute(digits.x.clone(), target=3)
    ours = esegeta.explain(digits.model, digits.x, "captum.DeepLift", target=3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_wrapped_segmentation_equals_hand_written_score(retina):
    """The threshold wrapper + IG equals Captum's IG on a score written by hand."""
    model, x = retina.model, retina.x
    with torch.no_grad():
        mask = (torch.sigmoid(model(x))[:, 0] > 0.5).float()

    def score(inp):
        prob = torch.sigmoid(model(inp))[:, 0]
        return torch.stack([(prob * (1 - mask)).sum((1, 2)), (prob * mask).sum((1, 2))], dim=1)

    theirs = ca.IntegratedGradients(score).attribute(x.clone(), target=1, n_steps=16)
    ours = esegeta.explain(model, x, "captum.IntegratedGradients", target=1, n_steps=16,
                           wrapper={"name": "threshold", "threshold": 0.5, "activation": "sigmoid"})
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
