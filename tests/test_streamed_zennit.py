"""Global patch mode's streamed zennit LRP composites (issue 22): per patch batch the composite's
own call, seeded with the patch's share of the relevance entering the stitched output, equals
zennit on the whole stitched model (the adapter's call with the wrapper's masked-sum rule), and
the unpatched result where the stitched prediction is the whole one."""
from __future__ import annotations

import pytest
import torch

import esegeta
from esegeta.attribution import streamed
from esegeta.errors import ConfigError

from conftest import no_streamed_fallback, pointwise_whole_and_streamed, SAMPLES, tissue_case

#: the composites' conservation on these random-weight models is not what is tested here
pytestmark = pytest.mark.filterwarnings("ignore::esegeta.attribution.explainer.AxiomWarning")
TILED = {"size": [8, 8, 8], "overlap": [0, 0, 0], "mode": "global", "batch_size": 2}
OVERLAPPING = {"size": [8, 8, 6], "overlap": [4, 4, 2], "mode": "global", "blend": "hann", "batch_size": 3}
SOFTMAX = {"name": "multiclass", "activation": "softmax"}
SIGMOID_MEAN = {"name": "threshold", "channel": 1, "activation": "sigmoid", "reduction": "mean", "threshold": 0.3}
#: rule maps whose relevance is linear in the seed; ``zbox`` without bounds takes the whole input's
FIRST_ZBOX = {"layer_map": {"Convolution": {"rule": "epsilon", "epsilon": 0.25}, "BatchNorm": "pass",
                            "Activation": "pass"},
              "first_map": {"Convolution": "zbox"}}

#: 2D patch grids (a 16×12 input): tiling, in batches of two, and overlapping with Hann blending
PATCHES_2D = [{"size": [8, 6], "overlap": [0, 0], "mode": "global", "batch_size": 2},
              {"size": [8, 6], "overlap": [4, 2], "mode": "global", "blend": "hann"}]


def _no_fallback(monkeypatch) -> None:
    no_streamed_fallback(monkeypatch, "the adapter")


def _on_the_stitched_model(method, *args, **kwargs) -> torch.Tensor:
    """zennit's own call on the whole stitched model (the adapter's path without the streamed algorithm)."""
    real = streamed.algorithm_of
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(streamed, "algorithm_of", lambda spec: None if spec.id == method else real(spec))
        return esegeta.explain(*args, **kwargs)


CASES = [("zennit.EpsilonPlus", {}), ("zennit.EpsilonGammaBox", {}), ("zennit.EpsilonAlpha2Beta1", {}),
         ("zennit.SpecialFirstLayerMapComposite", FIRST_ZBOX)]


@pytest.mark.parametrize("wrapper", [SOFTMAX, SIGMOID_MEAN], ids=["softmax", "sigmoid-mean"])
@pytest.mark.parametrize("patch", [TILED, OVERLAPPING], ids=["tiled", "overlapping"])
@pytest.mark.parametrize("method, params", CASES, ids=[c[0] for c in CASES])
def test_streamed_zennit_equals_zennit_on_the_stitched_model(method, params, patch, wrapper, monkeypatch):
    """A convolutional U-Net with batch norm (folded by the default canonizer, per patch) and skip
    connections: the streamed composite equals zennit on the whole stitched model, tiled and
    overlapping (Hann), softmax and sigmoid/mean wrappers; EpsilonGammaBox's and a ``zbox`` rule's
    default bounds are the whole input's, not a patch's."""
    case = tissue_case((16, 16, 8))
    theirs = _on_the_stitched_model(method, case.model, case.x, method, 1, wrapper=wrapper, patch=patch, **params)
    _no_fallback(monkeypatch)
    ours = esegeta.explain(case.model, case.x, method, 1, wrapper=wrapper, patch=patch, **params)
    assert theirs.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


POINTWISE_WRAPPERS = [SOFTMAX, SIGMOID_MEAN, {"name": "multiclass", "activation": "none"}]


@pytest.mark.parametrize("patch", [TILED, OVERLAPPING], ids=["tiled", "overlapping"])
@pytest.mark.parametrize("wrapper", POINTWISE_WRAPPERS, ids=[w["activation"] for w in POINTWISE_WRAPPERS])
def test_streamed_zennit_equals_unpatched_on_a_pointwise_model(wrapper, patch, monkeypatch):
    """On a pointwise model the stitched prediction is the whole one: the streamed composite equals
    zennit on the unpatched input, with each wrapper activation (Pass on softmax and sigmoid, none)."""
    whole, ours = pointwise_whole_and_streamed("zennit.EpsilonPlus", wrapper, patch, monkeypatch, "the adapter")
    torch.testing.assert_close(ours, whole, rtol=1e-4, atol=1e-5 * float(whole.abs().max()))


@pytest.mark.parametrize("patch", PATCHES_2D, ids=["tiled", "overlapping"])
def test_streamed_zennit_on_a_2d_input(patch, monkeypatch):
    """2D inputs (volumes of depth 1): a pointwise model, EpsilonGammaBox (the whole input's bounds)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 1), torch.nn.ReLU(), torch.nn.Conv2d(6, 3, 1)).eval()
    x = torch.randn(1, 2, 16, 12)
    whole = esegeta.explain(model, x, "zennit.EpsilonGammaBox", 1, wrapper=SOFTMAX)
    _no_fallback(monkeypatch)
    ours = esegeta.explain(model, x, "zennit.EpsilonGammaBox", 1, wrapper=SOFTMAX, patch=patch)
    assert whole.abs().max() > 0
    torch.testing.assert_close(ours, whole, rtol=1e-4, atol=1e-5 * float(whole.abs().max()))


@pytest.mark.parametrize("patch", [TILED, OVERLAPPING], ids=["tiled", "overlapping"])
def test_streamed_zennit_on_meta(patch, monkeypatch):
    """Every tensor the streamed composite makes lives on the data's device (torch's meta device)."""
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1))
    model = model.eval().to("meta")
    x = torch.randn(1, 1, 16, 16, 8, device="meta")
    _no_fallback(monkeypatch)
    for method in ("zennit.EpsilonPlus", "zennit.EpsilonGammaBox", "zennit.Gradient", "zennit.IntegratedGradients"):
        for wrapper in (SOFTMAX, SIGMOID_MEAN):
            attr = esegeta.explain(model, x, method, 1, wrapper=wrapper, patch=patch)
            assert attr.device == x.device and attr.shape == x.shape


def test_what_streaming_does_not_cover_goes_to_zennit_on_the_stitched_model_with_user_layer_names():
    """``trace`` (per-layer relevance of one call) and ReLU rules that clip the relevance's sign are
    not linear in the seed: zennit runs on the whole stitched model, masks frozen on the stitched
    output (the masked-sum rule), the network named as the user knows it (``name_map`` by the
    user's layer names; the stitched model's names gave "the model has no layer")."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1)).eval()
    x = torch.randn(1, 1, 16, 16, 8)
    params = {"name_map": {"0": "zplus", "2": {"rule": "epsilon", "epsilon": 1e-6}}, "trace": True}
    whole = esegeta.explain(model, x, "zennit.NameLayerMapComposite", 1, wrapper=SOFTMAX, **params)
    ours = esegeta.explain(model, x, "zennit.NameLayerMapComposite", 1, wrapper=SOFTMAX, patch=TILED, **params)
    torch.testing.assert_close(ours, whole, rtol=1e-4, atol=1e-5 * float(whole.abs().max()))
    assert not streamed.covers(esegeta.spec.registry.get("zennit.NameLayerMapComposite"), params, None)
    guided = {"layer_map": {"Convolution": "zplus", "ReLU": "guidedbackprop"}}
    assert not streamed.covers(esegeta.spec.registry.get("zennit.LayerMapComposite"), guided, None)
    with pytest.raises(ConfigError, match="no layer"):
        esegeta.explain(model, x, "zennit.NameLayerMapComposite", 1, wrapper=SOFTMAX, patch=TILED,
                        name_map={"model.0": "zplus"})


def test_provenance_and_checks_streamed_prediction(tmp_path):
    """A run records the streamed composite as ``provenance.computed_by``; ``check`` predicts its
    streamed peak (not the stitched model's volume copies), and none for what is not streamed."""
    import numpy as np

    from esegeta.attribution.patcher import Grid
    from esegeta.run.check import streamed_bytes
    from esegeta.spec.request import from_arguments

    case = tissue_case((16, 16, 8))
    np.save(tmp_path / "crop.npy", case.x[0, 0].numpy())

    config = {"model": {"factory": str(SAMPLES / "models.py") + ":TissueUNet3D",
                        "weights": str(SAMPLES / "checkpoints" / "tissue_unet3d.pt")},
              "inputs": {"paths": [str(tmp_path / "crop.npy")], "spatial_dims": 3},
              "wrapper": SOFTMAX, "target": 2, "patch": TILED,
              "output": {"dir": str(tmp_path / "out"), "formats": ["npy"]},
              "methods": [{"id": "zennit.EpsilonPlus"}]}
    result = esegeta.Pipeline(config).run()
    assert result.exit_code == 0, result.runs
    assert result.runs[0]["provenance"]["computed_by"] == (
        "esegeta.attribution.streamed.zennit_lrp (global patches, streamed; zennit.EpsilonPlus per patch batch)")
    grid = Grid.over((16, 16, 8), TILED["size"], TILED["overlap"], "average")
    for params, expected in (({}, True), ({"trace": True}, False)):
        request = from_arguments("zennit.EpsilonPlus", target=2, wrapper=SOFTMAX, patch=TILED, params=params)
        held = streamed_bytes(request, grid, 16 * 16 * 8, 4 * 16 * 16 * 8, 3 * 4 * 16 * 16 * 8)
        assert (held is not None) is expected


@pytest.mark.parametrize("method", ["zennit.EpsilonPlus", "captum.LRP"])
def test_no_structural_trace_runs_on_the_whole_volume(method, monkeypatch):
    """The substitutes' and the axiom record's structural trace (how LRP crosses the branches) reads
    the prepared network on the first patch: no trace runs the stitched model on the whole volume
    (on main the axiom check's record traced it, ~1.5 volumes at 256³)."""
    from esegeta.attribution import architectures

    seen = []
    real = architectures._traced

    def recording(model, x):
        seen.append(tuple(x.shape[2:]))
        return real(model, x)

    monkeypatch.setattr(architectures, "_traced", recording)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1)).eval()
    x = torch.randn(1, 1, 16, 16, 8)
    esegeta.explain(model, x, method, 1, wrapper=SOFTMAX, patch=TILED)
    assert seen and all(shape == tuple(TILED["size"]) for shape in seen), seen


GRADIENT_CASES = [("zennit.Gradient", {}), ("zennit.IntegratedGradients", {"n_iter": 5}),
                  ("zennit.IntegratedGradients", {"n_iter": 4, "baseline_fn": "blur"})]


@pytest.mark.parametrize("patch", [TILED, OVERLAPPING], ids=["tiled", "overlapping"])
@pytest.mark.parametrize("method, params", GRADIENT_CASES, ids=["gradient", "ig", "ig-blur"])
def test_streamed_zennit_attributors_equal_zennit_on_the_stitched_model(method, params, patch, monkeypatch):
    """zennit's Gradient and IntegratedGradients attributors without a composite run as streamed
    gradient methods (zennit's α grid, its adapter's baseline of the whole input), equal to zennit
    on the whole stitched model."""
    case = tissue_case((16, 16, 8))
    theirs = _on_the_stitched_model(method, case.model, case.x, method, 1, wrapper=case.wrapper, patch=patch,
                                    **params)
    _no_fallback(monkeypatch)
    ours = esegeta.explain(case.model, case.x, method, 1, wrapper=case.wrapper, patch=patch, **params)
    assert theirs.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))


@pytest.mark.parametrize("patch", PATCHES_2D, ids=["tiled", "overlapping"])
def test_streamed_zennit_integrated_gradients_on_a_2d_input(patch, monkeypatch):
    """2D: the blur baseline is the 2D input's (not of a volume of depth 1)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 3, 1)).eval()
    x = torch.randn(1, 2, 16, 12)
    method = "zennit.IntegratedGradients"
    theirs = _on_the_stitched_model(method, model, x, method, 1, wrapper=SOFTMAX, patch=patch, n_iter=4,
                                    baseline_fn="blur")
    _no_fallback(monkeypatch)
    ours = esegeta.explain(model, x, method, 1, wrapper=SOFTMAX, patch=patch, n_iter=4, baseline_fn="blur")
    assert theirs.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))


def test_zennit_attributors_with_a_composite_are_not_streamed():
    from esegeta.spec.registry import get

    assert streamed.covers(get("zennit.Gradient"), {}, None)
    assert not streamed.covers(get("zennit.Gradient"), {"composite": "EpsilonPlus"}, None)
    assert not streamed.covers(get("zennit.IntegratedGradients"), {"trace": True}, None)
