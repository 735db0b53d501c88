"""Wrapped segmenters in one upstream call per batch: every method whose adapter table declares a
batch layout other than per_input gives on a batch what it gives input by input, each input with
its own frozen masks."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from esegeta.attribution import batching, numerics, wrappers
from esegeta.spec import registry
from esegeta.attribution.batching import BatchLayoutError
from esegeta.attribution.call import call_once
from esegeta.attribution.prepare import prepared
from esegeta.spec.request import from_arguments

from conftest import SAMPLES, retina_case, tissue_case

#: The methods that explain a batch of wrapped inputs in one call, with their declared layout.
LAYOUTS = {m: spec.batch_layout for m, spec in registry.all_methods().items() if spec.batch_layout != batching.PER_INPUT}

#: Small settings so that each method runs in well under a second on the sample models.
PARAMS = {
    "captum.IntegratedGradients": {"n_steps": 4},
    "captum.LayerIntegratedGradients": {"n_steps": 4},
    "captum.LayerConductance": {"n_steps": 4},
    "captum.InternalInfluence": {"n_steps": 4},
    "zennit.IntegratedGradients": {"n_iter": 4},
}
#: Occlusion windows per sample (perturbations_per_eval > 1: several windows per forward pass).
OCCLUSION = {"retina2d": {"sliding_window_shapes": (3, 16, 16), "strides": (3, 16, 16), "perturbations_per_eval": 4},
             "tissue3d": {"sliding_window_shapes": (1, 10, 12, 8), "strides": (1, 10, 12, 8),
                          "perturbations_per_eval": 3}}
ZENNIT_OCCLUSION = {"retina2d": {"window": 16, "stride": 16}, "tissue3d": {"window": 8, "stride": 8}}


def retina_batch():
    """Three 48×48 crops of the retina sample with different vessel masks."""
    case = retina_case()
    image = np.asarray(Image.open(SAMPLES / "data" / "retina_crop.png"), dtype=np.float32) / 255.0
    full = torch.from_numpy(image).permute(2, 0, 1)
    x = torch.stack([full[:, r:r + 48, c:c + 48] for r, c in ((0, 0), (40, 64), (80, 16))]).contiguous()
    return case, x


def tissue_batch():
    """Two 3D crops of the tissue sample with different class maps."""
    case = tissue_case()
    full = case.x  # (1, 1, 20, 24, 16) around the centre; shift a second crop inside the volume
    import nibabel as nib

    volume = np.asarray(nib.load(str(SAMPLES / "data" / "anatomical.nii.gz")).dataobj, dtype=np.float32)
    volume = torch.from_numpy((volume - volume.mean()) / volume.std())
    second = volume[4:24, 6:30, 3:19][None, None]
    return case, torch.cat([full, second]).contiguous()


BATCHES = {"retina2d": retina_batch, "tissue3d": tissue_batch}


@pytest.fixture(scope="module", params=list(BATCHES))
def batch(request):
    case, x = BATCHES[request.param]()
    with numerics.fp32_numerics():
        ready = prepared(case.model, x[:1])
    return case, x, ready


def _params(method: str, case) -> dict:
    if method == "captum.Occlusion":
        return OCCLUSION[case.name]
    if method == "captum.FeatureAblation":  # 8×8 (2D) or 10×12×8 (3D) blocks, several per forward pass
        blocks = torch.arange(64).reshape(8, 8) if case.dims == 2 else torch.arange(8).reshape(2, 2, 2)
        size = (6, 6) if case.dims == 2 else (10, 12, 8)
        for d, n in enumerate(size):
            blocks = blocks.repeat_interleave(n, dim=d)
        return {"feature_mask": blocks[None, None], "perturbations_per_eval": 5}
    if method == "zennit.Occlusion":
        return ZENNIT_OCCLUSION[case.name]
    return PARAMS.get(method, {})


def _request(method: str, case):
    spec = registry.get(method)
    layer = case.layer_for(spec)
    return from_arguments(method, target="predicted", wrapper=case.wrapper, layer=layer, params=_params(method, case))


def _call(request, ready, x):
    torch.manual_seed(0)
    with numerics.fp32_numerics():
        return call_once(request, ready, x, samples=x, with_scores=True)


def test_the_crops_have_different_masks(batch):
    case, x, ready = batch
    masks = [wrappers.build(ready, x[i:i + 1], case.wrapper).score.masks for i in range(x.shape[0])]
    for i in range(len(masks)):
        for j in range(i):
            assert (masks[i] != masks[j]).float().mean() > 0.05  # a wrong row → input mapping changes the result


def test_every_method_declares_a_known_layout():
    assert {spec.batch_layout for spec in registry.all_methods().values()} <= {batching.ROWS, batching.TILE,
                                                                              batching.PER_INPUT}
    assert LAYOUTS, "no method explains a batch in one call"


@pytest.mark.parametrize("method", sorted(LAYOUTS))
def test_batched_equals_per_input(batch, method):
    case, x, ready = batch
    spec = registry.get(method)
    if case.dims not in spec.dims:
        pytest.skip(f"{method} has no {case.dims}D")
    if "segmentation" not in spec.tasks:
        pytest.skip(f"{method} explains classifiers only: no wrapped batch")
    request = _request(method, case)
    assert batching.layout(request, x.shape[0]) == LAYOUTS[method]
    batched = _call(request, ready, x)
    single = [_call(request, ready, x[i:i + 1]) for i in range(x.shape[0])]
    expected = torch.cat([s.result for s in single])
    assert batched.result.shape == expected.shape
    # rounding of the batched forward pass, relative to the largest value computed (scores for perturbation methods)
    scale = max(1.0, float(expected.abs().max()), *(abs(v) for s in single for v in s.scores if v is not None))
    torch.testing.assert_close(batched.result, expected, rtol=1e-5, atol=2e-6 * scale)
    assert batched.targets == tuple(t for s in single for t in s.targets)
    assert batched.predicted == tuple(p for s in single for p in s.predicted)
    want = [v for s in single for v in s.scores]
    assert [v is None for v in batched.scores] == [v is None for v in want]
    assert np.allclose([v for v in batched.scores if v is not None], [v for v in want if v is not None], rtol=1e-6)
    assert any(m is not None for m in batched.masks) or not registry.get(method).needs_target
    for got, want in zip(batched.masks, [m for s in single for m in s.masks], strict=True):
        assert (got is None and want is None) or torch.equal(got, want)


def test_undeclared_methods_and_noise_tunnels_run_one_input_per_call(retina):
    request = from_arguments("captum.GradientShap", wrapper=retina.wrapper)
    assert batching.layout(request, 3) == batching.PER_INPUT  # random baselines: not declared
    tunnel = from_arguments("captum.Saliency", wrapper=retina.wrapper, noise_tunnel={"nt_samples": 2})
    assert batching.layout(tunnel, 3) == batching.PER_INPUT  # NoiseTunnel interleaves its samples
    custom = from_arguments("captum.Saliency", wrapper={"name": "tests/custom.py:make"})
    assert batching.layout(custom, 3) == batching.PER_INPUT
    assert batching.layout(from_arguments("captum.Saliency", wrapper=retina.wrapper), 1) == batching.PER_INPUT
    assert batching.layout(from_arguments("captum.Saliency"), 3) == batching.PER_INPUT


@pytest.mark.parametrize("kind, rows", [(batching.ROWS, 6), (batching.ROWS, 2), (batching.TILE, 7), (batching.TILE, 2)])
def test_the_guard_refuses_rows_its_layout_does_not_allow(kind, rows):
    case, x = retina_batch()
    wrapped = batching.build(case.model, x, wrappers.wrapper_config(case.wrapper), None, kind, "captum.Saliency")
    with pytest.raises(BatchLayoutError, match=f"passed {rows} rows .* of 3 inputs; its layout '{kind}'"):
        wrapped(torch.cat([x, x, x])[:rows])


def test_a_wrong_declaration_is_caught_by_the_guard_not_used(retina, monkeypatch):
    """NoiseTunnel's rows are interleaved and GradientShap's are n_samples·B: declared "rows",
    the wrapped forward pass refuses them."""
    case, x = retina_batch()
    spec = registry.get("captum.GradientShap")
    monkeypatch.setitem(registry._REGISTRY, spec.id, dataclasses.replace(spec, batch_layout=batching.ROWS))
    with numerics.fp32_numerics():
        ready = prepared(case.model, x[:1])
        request = from_arguments("captum.GradientShap", target=1, wrapper=case.wrapper, params={"n_samples": 2})
        with pytest.raises(BatchLayoutError, match="captum.GradientShap passed 6 rows"):
            call_once(request, ready, x)


def test_tiled_rows_take_their_own_inputs_masks():
    case, x = retina_batch()
    config = wrappers.wrapper_config(case.wrapper)
    wrapped = batching.build(case.model, x, config, None, batching.TILE)
    rows = torch.cat([x, x * 0.5])
    with torch.no_grad():
        got = wrapped(rows)
        want = torch.cat([wrappers.build(case.model, x[i % 3:i % 3 + 1], config)(rows[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_run_batches_declared_wrapped_methods_and_keeps_each_inputs_results(tmp_path):
    """``runtime.batch_size`` 2 on the two retina samples: declared methods run as one job of two
    inputs, the others one input per job; every result, target and score equals batch_size 1."""
    from helpers_cli import valid_config

    from esegeta.run.runner import Pipeline

    data = SAMPLES / "data"
    methods = [{"id": "captum.Saliency"}, {"id": "captum.IntegratedGradients", "params": {"n_steps": 4}},
               {"id": "captum.Saliency", "label": "tunnel", "noise_tunnel": {"nt_samples": 2, "stdevs": 0.1}}]

    def run(batch):
        cfg = valid_config(tmp_path, methods,
                           model={"factory": str(SAMPLES / "models.py") + ":VesselUNet2D",
                                  "weights": str(SAMPLES / "checkpoints" / "vessel_unet2d.pt")},
                           inputs={"paths": [str(data / "retina_crop.png"), str(data / "retina_crop2.png")],
                                   "spatial_dims": 2},
                           wrapper=retina_case().wrapper, target="predicted",
                           runtime={"devices": "cpu", "batch_size": batch, "seed": 0},
                           output={"dir": str(tmp_path / f"out{batch}"), "formats": ["npy"]})
        return Pipeline(cfg).run()

    single, batched = run(1), run(2)
    assert single.exit_code == batched.exit_code == 0
    assert sorted((r["label"], r.get("batch", 1)) for r in batched.runs) == [
        ("captum.IntegratedGradients", 2), ("captum.IntegratedGradients", 2), ("captum.Saliency", 2),
        ("captum.Saliency", 2), ("tunnel", 1), ("tunnel", 1)]
    by_key = {(r["label"], r["input"]): r for r in batched.runs}
    for r in single.runs:
        b = by_key[(r["label"], r["input"])]
        assert (b.get("target"), b.get("predicted")) == (r.get("target"), r.get("predicted"))
        np.testing.assert_allclose(b.get("score"), r.get("score"), rtol=1e-5)
        want = single.result(r["label"], r["input"])  # rounding of the batched forward pass, relative to the largest value
        np.testing.assert_allclose(batched.result(r["label"], r["input"]), want, rtol=1e-5,
                                   atol=2e-6 * max(1.0, float(np.abs(want).max())))
