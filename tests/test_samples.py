"""Tests for the sample models, their checkpoints and sample inputs.

Real models, real data (shipped inside scikit-learn, scikit-image, nibabel),
no mocks.  Run from the repository root: ``python -m pytest tests/test_samples.py``.
"""

import glob
import os
import re
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from samples import train_anatomical, train_digits, train_retina  # noqa: E402
from samples.models import DigitResNet, TissueUNet3D, VesselUNet2D  # noqa: E402

MAX_CHECKPOINT_BYTES = 2 * 1024 * 1024

# Thresholds a little below the measured held-out metrics (see samples/README.md).
DIGITS_MIN_ACCURACY = 0.97    # measured 0.9867
RETINA_MIN_DICE = 0.85        # measured 0.8813
ANATOMICAL_MIN_DICE = 0.93    # measured 0.9581


def _load(model, path):
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def retina_data():
    return train_retina.load_data()


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("path", [train_digits.CHECKPOINT, train_retina.CHECKPOINT,
                                  train_anatomical.CHECKPOINT])
def test_checkpoint_small(path):
    assert os.path.isfile(path)
    assert os.path.getsize(path) <= MAX_CHECKPOINT_BYTES


# --------------------------------------------------------------------------- model contracts
def test_model_io_shapes():
    with torch.no_grad():
        assert DigitResNet().eval()(torch.rand(3, 1, 8, 8)).shape == (3, 10)
        for h, w in [(8, 8), (13, 17), (128, 128)]:
            assert VesselUNet2D().eval()(torch.rand(2, 3, h, w)).shape == (2, 1, h, w)
        for shape in [(4, 5, 6), (33, 41, 25)]:
            assert TissueUNet3D().eval()(torch.rand(1, 1, *shape)).shape == (1, 3) + shape


def test_unet_submodule_names():
    for cls in (VesselUNet2D, TissueUNet3D):
        names = dict(cls().named_children())
        for n in ("enc1", "pool1", "enc2", "pool2", "bottleneck", "up2", "dec2", "up1", "dec1", "head"):
            assert n in names, (cls.__name__, n)


def test_basicblock_reuses_one_inplace_relu():
    """The deliberate torchvision-style ReLU reuse: one module, called twice per block."""
    model = DigitResNet().eval()
    calls = {}
    for name in ("layer1", "layer2"):
        block = getattr(model, name)
        assert isinstance(block.relu, torch.nn.ReLU) and block.relu.inplace
        block.relu.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    assert model.layer2.downsample is not None
    with torch.no_grad():
        model(torch.rand(2, 1, 8, 8))
    assert calls == {"layer1": 2, "layer2": 2}


# --------------------------------------------------------------------------- digits
def test_digits_heldout_accuracy():
    x_train, x_test, y_train, y_test = train_digits.load_split()
    assert x_test.shape == (450, 1, 8, 8) and x_test.dtype == np.float32
    model = _load(DigitResNet(), train_digits.CHECKPOINT)
    assert train_digits.evaluate(model, x_test, y_test) >= DIGITS_MIN_ACCURACY


def test_digit_samples():
    _, x_test, _, y_test = train_digits.load_split()
    files = sorted(glob.glob(os.path.join(train_digits.SAMPLE_DIR, "digit_*_label*.npy")))
    assert len(files) == 4
    labels = set()
    for f in files:
        idx, k = map(int, re.fullmatch(r"digit_(\d+)_label(\d+)\.npy", os.path.basename(f)).groups())
        arr = np.load(f)
        assert arr.shape == (1, 8, 8) and arr.dtype == np.float32
        assert 0.0 <= arr.min() and arr.max() <= 1.0
        np.testing.assert_array_equal(arr, x_test[idx])
        assert y_test[idx] == k
        labels.add(k)
    assert len(labels) == 4


# --------------------------------------------------------------------------- retina
def test_retina_label_looks_like_vessels(retina_data):
    image, label = retina_data
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    assert label.shape == (512, 512) and set(np.unique(label)) == {0, 1}
    frac = label[train_retina.fov_mask(image)].mean()
    assert 0.05 < frac < 0.2


def test_retina_heldout_dice(retina_data):
    image, label = retina_data
    model = _load(VesselUNet2D(), train_retina.CHECKPOINT)
    assert train_retina.heldout_dice(model, image, label) >= RETINA_MIN_DICE


def test_retina_samples(retina_data):
    from skimage import io

    image, label = retina_data
    crop = io.imread(train_retina.CROP_PATH)
    crop_label = io.imread(train_retina.CROP_LABEL_PATH)
    crop2 = io.imread(train_retina.CROP2_PATH)
    assert crop.shape == (128, 128, 3) and crop.dtype == np.uint8
    assert crop2.shape == (128, 128, 3) and crop2.dtype == np.uint8
    assert crop_label.shape == (128, 128) and crop_label.dtype == np.uint8
    assert set(np.unique(crop_label)) == {0, 255}
    # the crops come from the held-out strip and match the derived label there
    (r1, c1), (r2, c2) = train_retina.choose_crops(image, label)
    assert c1 >= train_retina.SPLIT_COL and c2 >= train_retina.SPLIT_COL
    np.testing.assert_array_equal(crop, image[r1:r1 + 128, c1:c1 + 128])
    np.testing.assert_array_equal(crop2, image[r2:r2 + 128, c2:c2 + 128])
    np.testing.assert_array_equal(crop_label, label[r1:r1 + 128, c1:c1 + 128] * 255)
    assert (crop_label > 0).mean() > 0.05  # clearly visible vessels
    # and the model segments the crop on its own
    model = _load(VesselUNet2D(), train_retina.CHECKPOINT)
    from samples._common import dice
    assert dice(train_retina.predict(model, crop), crop_label > 0) >= 0.8


# --------------------------------------------------------------------------- anatomical
def test_anatomical_heldout_dice():
    volume_z, label = train_anatomical.load_data()
    assert volume_z.shape == (33, 41, 25) and volume_z.dtype == np.float32
    assert abs(float(volume_z.mean())) < 1e-3 and abs(float(volume_z.std()) - 1) < 1e-3
    model = _load(TissueUNet3D(), train_anatomical.CHECKPOINT)
    assert train_anatomical.heldout_dice(model, volume_z, label) >= ANATOMICAL_MIN_DICE


def test_anatomical_samples():
    import nibabel

    src = train_anatomical.load_nifti()
    vol = nibabel.load(train_anatomical.VOLUME_PATH)
    lab = nibabel.load(train_anatomical.LABEL_PATH)
    assert vol.shape == (33, 41, 25) and lab.shape == (33, 41, 25)
    np.testing.assert_array_equal(np.asarray(vol.dataobj), np.asarray(src.dataobj))
    assert vol.get_data_dtype() == src.get_data_dtype()
    np.testing.assert_allclose(vol.affine, src.affine)
    np.testing.assert_allclose(lab.affine, src.affine)
    lab_data = np.asarray(lab.dataobj)
    assert lab_data.dtype == np.uint8
    np.testing.assert_array_equal(lab_data, train_anatomical.derive_tissue_label(train_anatomical.load_volume()))
    assert set(np.unique(lab_data)) == {0, 1, 2}
