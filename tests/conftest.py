"""Shared fixtures: the three sample models on their real sample inputs."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from samples.models import DigitResNet, TissueUNet3D, VesselUNet2D  # noqa: E402


@dataclass
class Case:
    """A sample model, one input, and how to explain it."""

    name: str
    model: torch.nn.Module
    x: torch.Tensor
    target: Any
    layer: str
    leaf_layer: str
    wrapper: dict | None = None
    extra: dict = field(default_factory=dict)
    fused_layers: tuple[str, ...] = ()  # two layers for a method that fuses several (torchcam.RefineCAM)

    @property
    def dims(self) -> int:
        return self.x.ndim - 2

    def layer_for(self, spec) -> str | list[str] | None:
        """The ``layer`` a method takes here: none, the case's layer, a leaf layer, or the layers to fuse."""
        if not spec.needs_layer:
            return None
        if spec.fuses_layers:
            return list(self.fused_layers)
        return self.leaf_layer if spec.leaf_layer else self.layer

    @property
    def task(self) -> str:
        return "classification" if self.wrapper is None else "segmentation"


def _load(model: torch.nn.Module, checkpoint: str) -> torch.nn.Module:
    model.load_state_dict(torch.load(SAMPLES / "checkpoints" / checkpoint, weights_only=True))
    return model.eval()


def digits_case() -> Case:
    x = torch.from_numpy(np.load(SAMPLES / "data" / "digits" / "digit_30_label3.npy")).float()[None]
    return Case("digits", _load(DigitResNet(), "digit_resnet.pt"), x, 3, "layer2", "layer2.conv2",
                fused_layers=("layer1", "layer2"))


def retina_case(size: int = 48) -> Case:
    from PIL import Image

    image = np.asarray(Image.open(SAMPLES / "data" / "retina_crop.png"), dtype=np.float32) / 255.0
    x = torch.from_numpy(image).permute(2, 0, 1)[None, :, :size, :size].contiguous()
    wrapper = {"name": "threshold", "channel": 0, "threshold": 0.5, "activation": "sigmoid"}
    return Case("retina2d", _load(VesselUNet2D(), "vessel_unet2d.pt"), x, 1, "enc2", "enc2.3", wrapper,
                fused_layers=("enc1", "enc2"))


def tissue_case(crop: tuple[int, int, int] = (20, 24, 16)) -> Case:
    import nibabel as nib

    volume = np.asarray(nib.load(str(SAMPLES / "data" / "anatomical.nii.gz")).dataobj, dtype=np.float32)
    volume = (volume - volume.mean()) / volume.std()
    cx, cy, cz = (s // 2 for s in volume.shape)
    hx, hy, hz = (c // 2 for c in crop)
    x = torch.from_numpy(volume[cx - hx:cx + hx, cy - hy:cy + hy, cz - hz:cz + hz].copy())[None, None]
    wrapper = {"name": "multiclass", "activation": "softmax"}
    return Case("tissue3d", _load(TissueUNet3D(), "tissue_unet3d.pt"), x, 2, "enc2", "enc2.3", wrapper,
                fused_layers=("enc1", "enc2"))


CASES = {"digits": digits_case, "retina2d": retina_case, "tissue3d": tissue_case}


@pytest.fixture(scope="session", params=list(CASES))
def case(request) -> Case:
    return CASES[request.param]()


@pytest.fixture(scope="session")
def digits() -> Case:
    return digits_case()


@pytest.fixture(scope="session")
def retina() -> Case:
    return retina_case()


@pytest.fixture(scope="session")
def tissue() -> Case:
    return tissue_case()


def snapshot(model: torch.nn.Module) -> dict:
    """Everything about a model that explaining it must leave unchanged."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [(n, m.training) for n, m in model.named_modules()],
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules()],
        "inplace": [(n, getattr(m, "inplace", None)) for n, m in model.named_modules()],
        "hooks": hook_count(model),
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
    }


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["training"] == before["training"]
    assert after["inplace"] == before["inplace"]
    assert after["hooks"] == before["hooks"]
    assert after["grad"] == before["grad"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


def no_streamed_fallback(monkeypatch, what: str = "its library") -> None:
    """From here on, fail if a streamed method hands the whole call to its library on the stitched model
    (a streamed method calls it per patch only)."""
    from esegeta.attribution import streamed

    real = streamed.run_guarded

    def per_patch_only(spec, call):
        if not isinstance(call.forward, streamed._PatchShare):
            pytest.fail(f"fell back to {what} on the stitched model")
        return real(spec, call)

    monkeypatch.setattr(streamed, "run_guarded", per_patch_only)


def pointwise_whole_and_streamed(method: str, wrapper, patch, monkeypatch, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``method`` for class 1 on a seeded pointwise 3D segmenter (1x1x1 convolutions: its stitched
    prediction is the whole one), explained on the whole input and streamed patch by patch (no fallback
    to ``what`` on the stitched model): (whole, streamed), the whole map not all zero."""
    import esegeta

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1)).eval()
    x = torch.randn(1, 1, 16, 16, 8)
    whole = esegeta.explain(model, x, method, 1, wrapper=wrapper)
    no_streamed_fallback(monkeypatch, what)
    assert whole.abs().max() > 0
    return whole, esegeta.explain(model, x, method, 1, wrapper=wrapper, patch=patch)
