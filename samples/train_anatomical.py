"""Train :class:`samples.models.TissueUNet3D` on nibabel's bundled anatomical MRI.

Usage (from the repository root)::

    python samples/train_anatomical.py

Data: ``anatomical.nii`` shipped inside nibabel
(``os.path.join(os.path.dirname(nibabel.__file__), 'tests', 'data', 'anatomical.nii')``),
a 33x41x25 int16 (big-endian) T1-weighted brain volume, 2 mm voxels.  It is a
crop of the brain, so almost every voxel is tissue/CSF.

Preprocessing (model input): float32, z-score over the WHOLE volume,
``(x - x.mean()) / x.std()`` using the mean/std of all voxels; shape
(B, 1, X, Y, Z).

Label (classical, no manual annotation) -- see :func:`derive_tissue_label`:
``scipy.ndimage.gaussian_filter(volume, sigma=0.7)`` on the raw float32
intensities, then ``skimage.filters.threshold_multiotsu(smoothed, classes=3)``
and ``np.digitize``: 0 = darkest voxels (CSF / ventricles, plus the few
non-brain voxels), 1 = darker tissue (grey-matter-like), 2 = brighter tissue
(white-matter-like).  The thresholds are computed once on the whole volume.

Split: training crops (16^3, random flips on all three axes) are drawn only
from x < 22 (first axis); the slab x >= 22 is held out.  The held-out metric is
the mean Dice over classes 1 and 2 of the argmax prediction on the held-out
slab (the model sees only that slab) against the derived label.

Writes ``samples/checkpoints/tissue_unet3d.pt``, ``samples/data/anatomical.nii.gz``
(the original volume, original affine and header) and
``samples/data/anatomical_label.nii.gz`` (uint8 label, same affine).
"""

import os
import sys
import time

if __name__ == "__main__":
    # Let OpenMP threads sleep instead of spin-waiting at barriers (must be set
    # before torch is imported).  With 2 threads on 2 shared cores, spinning makes
    # training up to ~10x slower whenever another process is busy; results are
    # unchanged.  Only when run as a script, so importing this module has no side effect.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if __package__ in (None, ""):  # run as a script: make ``samples`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from samples._common import CHECKPOINT_DIR, DATA_DIR, dice, seed_everything  # noqa: E402
from samples.models import TissueUNet3D  # noqa: E402

CHECKPOINT = os.path.join(CHECKPOINT_DIR, "tissue_unet3d.pt")
VOLUME_PATH = os.path.join(DATA_DIR, "anatomical.nii.gz")
LABEL_PATH = os.path.join(DATA_DIR, "anatomical_label.nii.gz")

SPLIT_X = 22  # x < SPLIT_X train, x >= SPLIT_X held out
CROP = 16
BATCH = 8
ITERS = 250
LR = 3e-3
SMOOTH_SIGMA = 0.7
NUM_CLASSES = 3


def source_path() -> str:
    import nibabel

    return os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")


def load_nifti():
    """The original nibabel image object."""
    import nibabel

    return nibabel.load(source_path())


def load_volume() -> np.ndarray:
    """Raw intensities as float32 (33, 41, 25)."""
    return np.asarray(load_nifti().dataobj).astype(np.float32)


def zscore(volume: np.ndarray) -> np.ndarray:
    """Model preprocessing: ``(x - mean) / std`` over all voxels of the volume."""
    volume = volume.astype(np.float32)
    return ((volume - volume.mean()) / volume.std()).astype(np.float32)


def derive_tissue_label(volume: np.ndarray) -> np.ndarray:
    """3-class label: Gaussian smoothing (sigma 0.7 voxel) + 3-class multi-Otsu (uint8)."""
    from scipy import ndimage as ndi
    from skimage import filters

    smoothed = ndi.gaussian_filter(volume.astype(np.float32), sigma=SMOOTH_SIGMA)
    thresholds = filters.threshold_multiotsu(smoothed, classes=NUM_CLASSES)
    return np.digitize(smoothed, thresholds).astype(np.uint8)


def load_data():
    """Return ``(zscored float32 volume, uint8 label)``, both (33, 41, 25)."""
    volume = load_volume()
    return zscore(volume), derive_tissue_label(volume)


@torch.no_grad()
def predict(model: torch.nn.Module, volume_z: np.ndarray) -> np.ndarray:
    """Argmax class map for a z-scored (X, Y, Z) volume."""
    model.eval()
    return model(torch.from_numpy(np.ascontiguousarray(volume_z))[None, None]).argmax(1)[0].numpy()


def heldout_dice(model: torch.nn.Module, volume_z: np.ndarray, label: np.ndarray) -> float:
    """Mean Dice over classes 1 and 2 on the held-out slab x >= SPLIT_X
    (the model sees only that slab)."""
    pred = predict(model, volume_z[SPLIT_X:])
    target = label[SPLIT_X:]
    return float(np.mean([dice(pred == k, target == k) for k in (1, 2)]))


def _sample_batch(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """Random CROP^3 crops from the training slab, random flips on each axis."""
    shape = x.shape[1:]
    xs, ys = [], []
    for _ in range(BATCH):
        corner = [int(torch.randint(0, s - CROP + 1, (1,), generator=gen)) for s in shape]
        flips = torch.randint(0, 2, (3,), generator=gen).tolist()
        sl = tuple(slice(c, c + CROP) for c in corner)
        xp, yp = x[(slice(None),) + sl], y[sl]
        dims = [d for d, f in zip((1, 2, 3), flips) if f]
        if dims:
            xp, yp = xp.flip(dims), yp.flip([d - 1 for d in dims])
        xs.append(xp)
        ys.append(yp)
    return torch.stack(xs), torch.stack(ys)


def train(volume_z: np.ndarray, label: np.ndarray) -> TissueUNet3D:
    x = torch.from_numpy(np.ascontiguousarray(volume_z[:SPLIT_X]))[None]
    y = torch.from_numpy(label[:SPLIT_X].astype(np.int64))
    model = TissueUNet3D()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=ITERS, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    running = 0.0
    for it in range(ITERS):
        xb, yb = _sample_batch(x, y, gen)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if (it + 1) % 50 == 0:
            print(f"iter {it + 1:5d}  loss {running / 50:.4f}")
            running = 0.0
    return model


def save_samples(label: np.ndarray) -> None:
    import nibabel

    os.makedirs(DATA_DIR, exist_ok=True)
    src = load_nifti()
    # original data (int16), original affine and header, re-saved compressed
    nibabel.save(nibabel.Nifti1Image(np.asarray(src.dataobj), src.affine, src.header), VOLUME_PATH)
    lab_img = nibabel.Nifti1Image(label.astype(np.uint8), src.affine)
    lab_img.set_data_dtype(np.uint8)
    nibabel.save(lab_img, LABEL_PATH)


def main() -> None:
    t0 = time.time()
    seed_everything()
    volume_z, label = load_data()
    print("class fractions:", np.round(np.bincount(label.ravel(), minlength=3) / label.size, 3))
    model = train(volume_z, label)
    d = heldout_dice(model, volume_z, label)
    print(f"held-out mean Dice (classes 1, 2; x >= {SPLIT_X}): {d:.4f}")
    os.makedirs(CHECKPOINT_DIR, exist_ok=True)
    torch.save(model.state_dict(), CHECKPOINT)
    save_samples(label)
    print("wrote", os.path.relpath(CHECKPOINT), f"({os.path.getsize(CHECKPOINT)} bytes)")
    print("wrote", os.path.relpath(VOLUME_PATH), "and", os.path.relpath(LABEL_PATH))
    print(f"wall time {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
