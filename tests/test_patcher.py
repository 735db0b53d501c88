"""The patcher (SPEC §5): torchio grid sampling and blending, local and global modes, 2D and 3D."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import esegeta
from esegeta.attribution import wrappers
from esegeta.errors import ConfigError
from esegeta.attribution.patcher import Blend, Grid, Stitched, hann_window, to_volume

from conftest import ROOT, SAMPLES, retina_case, tissue_case

BINARY = {"name": "threshold", "channel": 1, "threshold": 0.5}


class Constant(nn.Module):
    """torchio's invariant: a 'model' writing −5 everywhere must aggregate to −5."""

    def forward(self, x):
        return torch.full((x.shape[0], 2, *x.shape[2:]), -5.0) + 0 * x.sum()


def pointwise(dims: int) -> nn.Module:
    """1×1(×1) convolutions: every output voxel depends on its own input voxel only, so a
    patched explanation must equal the unpatched one."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 1) if dims == 2 else nn.Conv3d(1, 2, 1)
    return nn.Sequential(conv, nn.Sigmoid()).eval()


def volume(dims: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(1, 1, *((22, 18) if dims == 2 else (14, 12, 10)))


def patch_of(dims: int, **kw) -> dict:
    size, overlap = ([8, 8], [2, 4]) if dims == 2 else ([6, 6, 4], [2, 2, 2])
    return {"size": size, "overlap": overlap, **kw}


# -- blending --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("blend", ["average", "hann"])
def test_constant_model_stitches_to_the_constant(dims, blend):
    x = volume(dims)
    patch = patch_of(dims)
    grid = Grid.over(tuple(x.shape[2:]), patch["size"], patch["overlap"], blend)
    assert len(grid.locations) > 4
    out = Stitched(Constant(), grid, dims, batch_size=3).assemble(x)
    assert out.shape == (1, 2, *x.shape[2:])
    torch.testing.assert_close(out, torch.full_like(out, -5.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("blend", ["average", "hann"])
@pytest.mark.parametrize("scale", [(1, 1, 1), (2, 2, 2)])
def test_constant_patches_aggregate_to_the_constant(blend, scale):
    """The local mode's aggregation, at input resolution and on a layer's grid twice coarser."""
    grid = Grid.over((16, 20, 12), [8, 8, 4], [4, 2, 2], blend)
    patch = torch.full((len(grid.locations), 3, *(p // s for p, s in zip(grid.size, scale))), -5.0)
    blend_ = Blend(grid, scale, patch)
    blend_.add(patch, grid.locations)
    out = blend_.output()
    assert out.shape == (3, 16 // scale[0], 20 // scale[1], 12 // scale[2])
    torch.testing.assert_close(out, torch.full_like(out, -5.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("blend", ["average", "hann"])
@pytest.mark.parametrize("scale", [(1, 1, 1), (2, 2, 2)])
def test_blend_is_torchios_aggregator(blend, scale):
    """Local mode's on-device blending does torchio's GridAggregator arithmetic, to the bit."""
    from types import SimpleNamespace

    import torchio as tio

    grid = Grid.over((16, 20, 12), [8, 8, 4], [4, 2, 2], blend)
    torch.manual_seed(0)
    patches = torch.randn(len(grid.locations), 3, *(p // s for p, s in zip(grid.size, scale)))
    ours = Blend(grid, scale, patches)
    for start in range(0, len(patches), 3):  # in batches, as local mode adds them
        ours.add(patches[start:start + 3], grid.locations[start:start + 3])
    sampler = SimpleNamespace(  # the fields GridAggregator reads from a sampler, on the coarse grid
        subject=SimpleNamespace(spatial_shape=tuple(n // s for n, s in zip(grid.shape, scale))), padding_mode=None,
        patch_overlap=np.asarray([o // s for o, s in zip(grid.overlap, scale)]),
        patch_size=np.asarray([p // s for p, s in zip(grid.size, scale)]))
    theirs = tio.GridAggregator(sampler, overlap_mode=blend)
    coarse = torch.as_tensor(np.concatenate([grid.locations[:, :3] // scale, grid.locations[:, 3:] // scale], 1))
    theirs.add_batch(patches, coarse)
    assert torch.equal(ours.output(), theirs.get_output_tensor())
    size = tuple(p // s for p, s in zip(grid.size, scale))
    assert torch.equal(hann_window(size), tio.GridAggregator._get_hann_window(np.asarray(size)).float())


@pytest.mark.parametrize("blend", ["average", "hann"])
def test_stitched_prediction_is_torchios_aggregation(blend):
    """The differentiable stitching equals torchio's GridSampler + GridAggregator on a real model."""
    import torchio as tio

    case = tissue_case()
    model, x = case.model, case.x
    stitched = Stitched(model, Grid.over(tuple(x.shape[2:]), [12, 12, 8], [4, 4, 2], blend), 3, 4)
    ours = stitched.assemble(x)[0]
    subject = tio.Subject(image=tio.ScalarImage(tensor=x[0]))
    sampler = tio.GridSampler(subject, (12, 12, 8), (4, 4, 2))
    aggregator = tio.GridAggregator(sampler, overlap_mode=blend)
    with torch.no_grad():
        for batch in tio.SubjectsLoader(sampler, batch_size=4):
            aggregator.add_batch(model(batch["image"][tio.DATA]), batch[tio.LOCATION])
    torch.testing.assert_close(ours, aggregator.get_output_tensor(), rtol=1e-5, atol=1e-5)
    assert not torch.equal(ours, model(x)[0].detach())  # patches see less context: a real difference


def test_stitched_gradient_is_autograds():
    """The checkpointed per-patch backward equals autograd through an ordinary stitched forward."""
    case = retina_case(32)
    grid = Grid.over((32, 32), [16, 16], [6, 6], "hann")
    stitched = Stitched(case.model, grid, 2, 2)
    x = case.x.clone().requires_grad_(True)
    weights = torch.randn(1, 1, 32, 32)
    (ours,) = torch.autograd.grad((stitched(x) * weights).sum(), x)
    window, total = stitched.weights(x.device)
    x5, plain = to_volume(x), 0
    for loc in grid.locations:
        sl = grid.slices(loc)
        out = torch.zeros(1, 1, 32, 32, 1)
        out[sl] = to_volume(case.model(x5[sl][..., 0])) * window / total[sl[2:]]
        plain = plain + out
    (reference,) = torch.autograd.grad((plain[..., 0] * weights).sum(), x)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


# -- patched equals unpatched on a pointwise model -------------------------------------------------

@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mode", ["local", "global"])
@pytest.mark.parametrize("blend", ["average", "hann"])
@pytest.mark.parametrize("method, params", [("captum.Saliency", {}), ("captum.IntegratedGradients", {"n_steps": 8})])
def test_pointwise_model_patched_equals_unpatched(dims, mode, blend, method, params):
    model, x = pointwise(dims), volume(dims)
    whole = esegeta.explain(model, x, method, 1, wrapper=BINARY, **params)
    patched = esegeta.explain(model, x, method, 1, wrapper=BINARY, patch=patch_of(dims, mode=mode, blend=blend),
                              **params)
    assert patched.shape == whole.shape and whole.abs().max() > 0
    torch.testing.assert_close(patched, whole, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["captum.GuidedBackprop", "captum.DeepLift"])
def test_hooking_methods_in_global_mode_equal_unpatched(method):
    """Methods that hook the network's modules see one call per patch batch; DeepLift's
    (inputs, baselines) halves stay paired because patch batches are item-major."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 1), nn.ReLU(), nn.Conv3d(4, 2, 1), nn.Sigmoid()).eval()
    x = volume(3)
    whole = esegeta.explain(model, x, method, 1, wrapper=BINARY)
    patched = esegeta.explain(model, x, method, 1, wrapper=BINARY, patch=patch_of(3, mode="global", blend="hann"))
    assert whole.abs().max() > 0
    torch.testing.assert_close(patched, whole, rtol=1e-5, atol=1e-7)


SOFTMAX = {"name": "multiclass", "activation": "softmax"}
SIGMOID_MEAN = {"name": "threshold", "channel": 1, "activation": "sigmoid", "reduction": "mean"}


@pytest.mark.parametrize("wrapper, method", [
    (SOFTMAX, "captum.Saliency"), (SOFTMAX, "captum.IntegratedGradients"),
    (SIGMOID_MEAN, "captum.Saliency"), (SIGMOID_MEAN, "captum.IntegratedGradients"), (SIGMOID_MEAN, "captum.DeepLift"),
])
def test_global_score_with_activations_equals_unpatched(wrapper, method):
    """Built-in wrappers' scores are computed region by region in global mode (softmax,
    sigmoid, mean reduction); DeepLift, which hooks the activation, takes the plain graph.
    (DeepLift through a softmax wrapper differs by ~2e-3 of the maximum once patches overlap,
    exact without overlap or without the softmax: a known gap, cause not pinned down.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 1), nn.ReLU(), nn.Conv3d(4, 3, 1)).eval()
    x = volume(3)
    whole = esegeta.explain(model, x, method, 1, wrapper=wrapper)
    patched = esegeta.explain(model, x, method, 1, wrapper=wrapper, patch=patch_of(3, mode="global", blend="hann"))
    assert whole.abs().max() > 0
    torch.testing.assert_close(patched, whole, rtol=1e-4, atol=1e-4 * float(whole.abs().max()))


def test_layer_results_blend_on_the_layers_grid():
    """A layer twice coarser than the input: patch locations are halved (local mode)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.Sigmoid(), nn.AvgPool3d(2), nn.Conv3d(2, 2, 1),
                          nn.Upsample(scale_factor=2)).eval()
    x = volume(3)[..., :12, :12, :8]
    kw = {"wrapper": BINARY, "layer": "2"}
    whole = esegeta.explain(model, x, "captum.LayerActivation", 1, **kw)
    patched = esegeta.explain(model, x, "captum.LayerActivation", 1, patch={"size": [8, 8, 4], "overlap": [4, 4, 0],
                                                                            "blend": "hann"}, **kw)
    assert whole.shape == (1, 2, 6, 6, 4)
    torch.testing.assert_close(patched, whole, rtol=1e-5, atol=1e-6)


def test_layer_grid_must_align():
    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.AvgPool3d(2), nn.Upsample(scale_factor=2)).eval()
    with pytest.raises(ConfigError, match="multiples of"):
        esegeta.explain(model, volume(3)[..., :13, :12, :8], "captum.LayerActivation", 1, wrapper=BINARY, layer="1",
                        patch={"size": [6, 6, 4], "overlap": [2, 2, 0]})


def test_local_region_mask_is_cropped_per_patch(tmp_path):
    model, x = pointwise(2), volume(2)
    np.save(tmp_path / "mask.npy", (np.random.default_rng(0).random(x.shape[2:]) > 0.5).astype(np.float32))
    region = {"name": "region", "mask": str(tmp_path / "mask.npy"), "activation": "none"}
    whole = esegeta.explain(model, x, "captum.Saliency", 1, wrapper=region)
    patched = esegeta.explain(model, x, "captum.Saliency", 1, wrapper=region, patch=patch_of(2))
    torch.testing.assert_close(patched, whole, rtol=1e-5, atol=1e-7)


# -- global mode on a real model -------------------------------------------------------------------

def test_integrated_gradients_global_completeness():
    """Σ attribution = S(x) − S(baseline) for the stitched prediction's score (256 steps, within 1%)."""
    case = tissue_case((12, 12, 8))
    model, x = case.model, case.x
    patch = {"size": [8, 8, 8], "overlap": [4, 4, 0], "mode": "global", "blend": "hann", "batch_size": 4}
    attr = esegeta.explain(model, x, "captum.IntegratedGradients", 2, wrapper=case.wrapper, patch=patch,
                           n_steps=256, internal_batch_size=128)
    grid = Grid.over(tuple(x.shape[2:]), patch["size"], patch["overlap"], "hann")
    forward = wrappers.build(Stitched(model, grid, 3, 4), x, case.wrapper)
    with torch.no_grad():
        delta = float(forward(x)[0, 2] - forward(torch.zeros_like(x))[0, 2])
    assert abs(delta) > 1
    print(f"IG global completeness: sum {float(attr.sum()):.5f}, S(x) - S(0) {delta:.5f}")
    assert float(attr.sum()) == pytest.approx(delta, rel=0.01)
    # the stitched score differs from the unpatched one: global mode explains the stitched prediction
    whole = wrappers.build(model, x, case.wrapper)
    assert float(whole.unperturbed[0, 2]) != pytest.approx(float(forward.unperturbed[0, 2]), rel=1e-4)


def test_global_mode_needs_a_wrapper_and_an_input_resolution_method():
    model, x = pointwise(3), volume(3)
    with pytest.raises(ConfigError, match="set a wrapper"):
        esegeta.explain(model, x, "captum.Saliency", 1, patch=patch_of(3, mode="global"))
    with pytest.raises(ConfigError, match="use mode 'local'"):
        esegeta.explain(model, x, "captum.LayerActivation", 1, wrapper=BINARY, layer="0",
                        patch=patch_of(3, mode="global"))
    with pytest.raises(ConfigError, match="patch"):
        esegeta.explain(model, x, "captum.Saliency", 1, wrapper=BINARY, patch={"size": [6, 6], "overlap": [2, 3]})


def test_pipeline_patched_run_writes_nifti_with_the_inputs_affine(tmp_path):
    config = json.loads((ROOT / "configs" / "anatomical3d.json").read_text())
    config.pop("$schema")
    config["model"] = {"factory": str(SAMPLES / "models.py") + ":TissueUNet3D",
                       "weights": str(SAMPLES / "checkpoints" / "tissue_unet3d.pt")}
    config["inputs"]["paths"] = [str(SAMPLES / "data" / "anatomical.nii.gz")]
    config["output"] = {"dir": str(tmp_path), "formats": ["npy", "nii"]}
    config["patch"] = {"size": [16, 16, 16], "overlap": [4, 4, 4], "mode": "global", "blend": "hann"}
    config["methods"] = [{"id": "captum.Saliency"},
                         {"id": "captum.IntegratedGradients", "params": {"n_steps": 4},
                          "patch": {"size": [16, 16, 16], "overlap": [4, 4, 4], "mode": "local"}}]
    result = esegeta.Pipeline(config).run()
    assert result.exit_code == 0, result.runs
    source = nib.load(str(SAMPLES / "data" / "anatomical.nii.gz"))
    run = result.runs[0]
    saved = nib.load(str(tmp_path / run["files"]["nii"]))
    assert saved.shape == source.shape
    np.testing.assert_allclose(saved.affine, source.affine)
    assert np.abs(np.asarray(saved.dataobj)).max() > 0
    assert run["score"] is not None
    # the record says the global result came from esegeta's streamed algorithm (local: no such record)
    assert run["provenance"]["computed_by"].startswith("esegeta.attribution.streamed.saliency (global patches")
    assert "provenance" not in result.runs[1] and result.runs[1]["method"] == "captum.IntegratedGradients"
    # patch.batch_size not set: the run picks the largest that fits the free memory and records it
    assert run["patch_batch_size"]["value"] >= 1 and run["patch_batch_size"]["from"].startswith("free memory on cpu")
    assert "patch_batch_size" not in result.runs[1]


def test_global_patch_batch_size_from_the_memory_budget(tmp_path):
    """runtime.memory_gb bounds the patches per call the run picks (check's estimate); a set
    patch.batch_size stands."""
    case = tissue_case((32, 32, 16))
    np.save(tmp_path / "crop.npy", case.x[0, 0].numpy())
    config = {"model": {"factory": str(SAMPLES / "models.py") + ":TissueUNet3D",
                        "weights": str(SAMPLES / "checkpoints" / "tissue_unet3d.pt")},
              "inputs": {"paths": [str(tmp_path / "crop.npy")], "spatial_dims": 3},
              "wrapper": {"name": "multiclass", "activation": "softmax"}, "target": 2,
              "patch": {"size": [8, 8, 8], "mode": "global"},
              "output": {"formats": ["npy"]}, "methods": [{"id": "captum.Saliency"}]}
    chosen = {}
    for gb in (0.005, 4.0):
        config["output"]["dir"] = str(tmp_path / f"{gb}")
        config["runtime"] = {"memory_gb": gb}
        result = esegeta.Pipeline(config).run()
        assert result.exit_code == 0, result.runs
        chosen[gb] = result.runs[0]["patch_batch_size"]
        assert chosen[gb]["from"] == f"runtime.memory_gb ({gb} GiB)"
    assert 1 <= chosen[0.005]["value"] < chosen[4.0]["value"] == 32  # 32 patches of 8³: all fit in 4 GiB
    config["patch"]["batch_size"] = 3
    config["output"]["dir"] = str(tmp_path / "set")
    assert "patch_batch_size" not in esegeta.Pipeline(config).run().runs[0]


# -- 3D conventions: depth and channel axes, results in the input's own order ----------------------

def _crop() -> np.ndarray:
    return tissue_case((16, 16, 8)).x[0, 0].numpy()  # (x, y, z): depth last, as the model takes it


def _run(tmp_path, name: str, inputs: dict) -> esegeta.run.runner.RunResult:
    config = {"model": {"factory": str(SAMPLES / "models.py") + ":TissueUNet3D",
                        "weights": str(SAMPLES / "checkpoints" / "tissue_unet3d.pt")},
              "inputs": {"spatial_dims": 3, **inputs},
              "wrapper": {"name": "multiclass", "activation": "softmax"}, "target": 2,
              "output": {"dir": str(tmp_path / name), "formats": ["npy", "nii"]},
              "methods": [{"id": "captum.Saliency"}, {"id": "captum.LayerActivation", "layer": "enc2"}]}
    result = esegeta.Pipeline(config).run()
    assert result.exit_code == 0, result.runs
    return result


def test_depth_first_arrays_are_fed_depth_last_and_saved_depth_first(tmp_path):
    from esegeta.io.loading import load_inputs

    crop = _crop()
    np.save(tmp_path / "last.npy", crop)
    np.save(tmp_path / "first.npy", np.moveaxis(crop, -1, 0))
    torch.save(torch.from_numpy(np.moveaxis(crop, -1, 0).copy()), tmp_path / "first.pt")
    for name in ("first.npy", "first.pt"):
        (item,) = load_inputs({"paths": [str(tmp_path / name)], "spatial_dims": 3, "depth_axis": "first"}, None)
        assert torch.equal(item.tensor, torch.from_numpy(crop)[None, None])
    last = _run(tmp_path, "last", {"paths": [str(tmp_path / "last.npy")]})
    first = _run(tmp_path, "first", {"paths": [str(tmp_path / "first.npy")], "depth_axis": "first"})
    for method in ("captum.Saliency", "captum.LayerActivation"):
        expected = np.moveaxis(last.result(method), -1, 1)  # (C, x, y, z) → (C, z, x, y)
        assert first.result(method).shape == expected.shape
        np.testing.assert_allclose(first.result(method), expected, rtol=1e-5, atol=1e-7)
    run_last, run_first = last.runs[0], first.runs[0]
    nii_last = np.asarray(nib.load(str(last.output_dir / run_last["files"]["nii"])).dataobj)
    nii_first = np.asarray(nib.load(str(first.output_dir / run_first["files"]["nii"])).dataobj)
    np.testing.assert_allclose(nii_first, np.moveaxis(nii_last, -1, 0), rtol=1e-5, atol=1e-7)


def test_channel_axis(tmp_path):
    from esegeta.io.loading import load_inputs

    crop = _crop()
    np.save(tmp_path / "last.npy", crop[..., None])
    np.save(tmp_path / "none.npy", crop)
    expected = torch.from_numpy(crop)[None, None]
    for name, axis in (("last.npy", "last"), ("none.npy", "none"), ("none.npy", "auto")):
        (item,) = load_inputs({"paths": [str(tmp_path / name)], "spatial_dims": 3, "channel_axis": axis}, None)
        assert torch.equal(item.tensor, expected), (name, axis)
    with pytest.raises(ConfigError, match="inputs.channel_axis"):
        load_inputs({"paths": [str(tmp_path / "none.npy")], "spatial_dims": 3, "channel_axis": "first"}, None)
    channels_last = _run(tmp_path, "channels_last", {"paths": [str(tmp_path / "last.npy")], "channel_axis": "last"})
    plain = _run(tmp_path, "plain", {"paths": [str(tmp_path / "none.npy")], "channel_axis": "none"})
    saved = channels_last.result("captum.Saliency")
    assert saved.shape == (*crop.shape, 1)  # channels last, as in the file
    np.testing.assert_allclose(saved, np.moveaxis(plain.result("captum.Saliency"), 0, -1), rtol=1e-6, atol=0)


def test_nifti_keeps_its_voxel_order_whatever_depth_axis():
    from esegeta.io.loading import load_inputs

    source = nib.load(str(SAMPLES / "data" / "anatomical.nii.gz"))
    (item,) = load_inputs({"paths": [str(SAMPLES / "data" / "anatomical.nii.gz")], "spatial_dims": 3,
                           "depth_axis": "first"}, None)
    assert tuple(item.tensor.shape) == (1, 1, *source.shape) and not item.depth_first
    np.testing.assert_array_equal(item.affine, source.affine)


def test_validate_refuses_global_mode_for_a_layer_method():
    config = {"model": {"factory": str(SAMPLES / "models.py") + ":TissueUNet3D"},
              "inputs": {"paths": [str(SAMPLES / "data" / "anatomical.nii.gz")], "spatial_dims": 3},
              "wrapper": {"name": "multiclass"}, "target": 2,
              "methods": [{"id": "captum.LayerActivation", "layer": "enc2",
                           "patch": {"size": [16, 16, 16], "mode": "global"}}]}
    with pytest.raises(ConfigError, match=r"methods\[0\]\.patch\.mode: .*use mode 'local'"):
        esegeta.Pipeline(config).validate()
    config["methods"][0]["patch"]["size"] = [16, 16]
    with pytest.raises(ConfigError, match=r"methods\[0\]\.patch\.size: needs 3 sizes"):
        esegeta.Pipeline(config)


# -- global mode: whole-input tensors held once per step (issue 22) --------------------------------

class _LargestWholeInput(torch.utils._python_dispatch.TorchDispatchMode):
    """Records, over every tensor an op creates with the whole input's spatial shape, the most
    rows × channels one held: the whole-input memory a global-patch step needs."""

    def __init__(self, spatial: tuple[int, ...]):
        super().__init__()
        self.spatial, self.largest = tuple(spatial), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t) and t.ndim > len(self.spatial) and tuple(t.shape[-len(self.spatial):]) == self.spatial:
                self.largest = max(self.largest, t[(..., *([0] * len(self.spatial)))].numel())
        return out


@pytest.mark.parametrize("method, kwargs", [
    ("captum.IntegratedGradients", {"n_steps": 8, "internal_batch_size": 4}),
    ("captum.IntegratedGradients", {"n_steps": 6}),
    ("captum.Saliency", {"noise_tunnel": {"nt_type": "smoothgrad", "nt_samples": 4, "stdevs": 0.1}}),
    ("captum.Occlusion", {"sliding_window_shapes": (1, 4, 4, 4), "strides": (1, 4, 4, 4),
                          "perturbations_per_eval": 4}),
])
def test_global_mode_holds_one_whole_input_row_at_a_time(method, kwargs):
    """A method's internal batch (Captum's internal_batch_size, nt_samples_batch_size,
    perturbations_per_eval) multiplied the whole-input tensors of a global-patch step; now one
    row at a time goes through the stitched model, its patches batched instead: no tensor at the
    input's size holds more than the stitched output's channels, and the result is unchanged."""
    case = tissue_case((16, 16, 8))
    model, x = case.model, case.x
    patch = {"size": [8, 8, 8], "overlap": [0, 0, 0], "mode": "global", "batch_size": 2}
    with _LargestWholeInput(x.shape[2:]) as seen:
        attr = esegeta.explain(model, x, method, 2, wrapper=case.wrapper, patch=patch, **kwargs)
    channels = 3  # TissueUNet3D's output: the largest whole-input tensor is the stitched prediction
    assert seen.largest <= channels, seen.largest
    rows = {**kwargs, **({"internal_batch_size": 1} if "internal_batch_size" in kwargs else {})}
    if "noise_tunnel" in rows:
        rows["noise_tunnel"] = {**rows["noise_tunnel"], "nt_samples_batch_size": 1}
    if "perturbations_per_eval" in rows:
        rows["perturbations_per_eval"] = 1
    reference = esegeta.explain(model, x, method, 2, wrapper=case.wrapper, patch=patch, **rows)
    if method != "captum.Saliency":  # SmoothGrad draws noise: same seed, but not the same draws per row
        torch.testing.assert_close(attr, reference, rtol=1e-4, atol=1e-6)


SEEING_MODEL = '''
import torch
from torch import nn


class Seeing(nn.Module):
    """Records the spatial shape of every input its forward sees."""
    seen = []

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x):
        Seeing.seen.append(tuple(x.shape[2:]))
        return self.conv(x)


def build():
    torch.manual_seed(0)
    return Seeing().eval()
'''


@pytest.mark.parametrize("wrapper", [{"name": "multiclass", "activation": "softmax"}, "region"])
def test_a_global_patch_run_never_passes_the_whole_volume_through_the_model(tmp_path, wrapper):
    """Before: planning (the prepared copy, each entry's wrapper and target check) ran the model on
    the whole first input, a clinical volume's activations at once; now on the first patch."""
    (tmp_path / "seeing.py").write_text(SEEING_MODEL)
    volume = torch.rand(24, 24, 16, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "volume.npy", volume.numpy())
    if wrapper == "region":
        mask = np.zeros((24, 24, 16), dtype=np.uint8)
        mask[4:12, 4:12, 2:10] = 1
        np.save(tmp_path / "mask.npy", mask)
        wrapper = {"name": "region", "mask": "mask.npy", "activation": "none"}
    config = {"model": {"factory": "seeing.py:build"},
              "inputs": {"paths": ["volume.npy"], "spatial_dims": 3},
              "wrapper": wrapper, "target": 1 if wrapper["name"] == "multiclass" else 0,
              "patch": {"size": [8, 8, 8], "overlap": [2, 2, 2], "mode": "global"},
              "output": {"dir": "out", "formats": ["npy"]}, "methods": [{"id": "captum.Saliency"}]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    pipeline = esegeta.Pipeline(tmp_path / "config.json")
    seen = type(pipeline.validate().model).seen
    assert seen and max(np.prod(s) for s in seen) <= 8 * 8 * 8, seen
    result = pipeline.run()
    assert result.exit_code == 0, result.runs
    assert max(np.prod(s) for s in seen) <= 8 * 8 * 8


def test_a_region_mask_of_another_shape_is_refused_with_patches(tmp_path):
    (tmp_path / "seeing.py").write_text(SEEING_MODEL)
    np.save(tmp_path / "volume.npy", np.random.default_rng(0).random((24, 24, 16)).astype(np.float32))
    np.save(tmp_path / "mask.npy", np.ones((24, 24, 8), dtype=np.uint8))
    config = {"model": {"factory": "seeing.py:build"}, "inputs": {"paths": ["volume.npy"], "spatial_dims": 3},
              "wrapper": {"name": "region", "mask": "mask.npy"}, "target": 0,
              "patch": {"size": [8, 8, 8], "mode": "global"},
              "output": {"dir": "out", "formats": ["npy"]}, "methods": [{"id": "captum.Saliency"}]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="wrapper.mask"):
        esegeta.Pipeline(tmp_path / "config.json").validate()


def test_lrp_with_a_noise_tunnel_in_global_mode_is_refused_before_the_run(tmp_path):
    """Captum's LRP runs in global mode only as the streamed algorithm, which takes no noise tunnel:
    before, the call fell back to Captum on the stitched model and raised Captum's TypeError."""
    nt = {"nt_type": "smoothgrad", "nt_samples": 2, "stdevs": 0.1}
    model = pointwise(3)
    with pytest.raises(ConfigError, match="no noise tunnel"):
        esegeta.explain(model, volume(3), "captum.LRP", 1, wrapper=BINARY, noise_tunnel=nt,
                        patch=patch_of(3, mode="global"))
    (tmp_path / "seeing.py").write_text(SEEING_MODEL)
    np.save(tmp_path / "volume.npy", np.random.default_rng(0).random((16, 16, 8)).astype(np.float32))
    config = {"model": {"factory": "seeing.py:build"}, "inputs": {"paths": ["volume.npy"], "spatial_dims": 3},
              "wrapper": {"name": "multiclass", "activation": "softmax"}, "target": 1,
              "patch": {"size": [8, 8, 8], "mode": "global"}, "output": {"dir": "out", "formats": ["npy"]},
              "methods": [{"id": "captum.LRP", "noise_tunnel": nt}]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="no noise tunnel"):
        esegeta.Pipeline(tmp_path / "config.json").validate()
