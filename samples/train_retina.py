"""Train :class:`samples.models.VesselUNet2D` on scikit-image's retina photograph.

Usage (from the repository root)::

    python samples/train_retina.py

Data: ``skimage.data.retina()`` (1411x1411 RGB fundus photograph shipped inside
scikit-image as ``retina.jpg``), resized to 512x512 with
``skimage.transform.resize(..., anti_aliasing=True)``.  Model input: RGB float32
in [0, 1] (uint8 / 255), shape (B, 3, H, W).

Vessel label (classical, no manual annotation) -- see :func:`derive_vessel_label`:

1. field of view (FOV): red channel > 0.2, binary opening (disk 3), then
   eroded by a disk of radius 6 to drop the bright rim of the disc;
2. green channel inverted (vessels become bright), pixels outside the FOV
   set to the FOV median, CLAHE ``equalize_adapthist(clip_limit=0.01)``;
3. ``frangi(sigmas=range(1, 4), black_ridges=False)``; vesselness set to 0
   outside the eroded FOV;
4. threshold at the 88th percentile of the vesselness inside the eroded FOV;
5. connected components (8-connectivity) smaller than 30 pixels removed.

Split: training patches come only from the LEFT 60 % of the 512x512 image
(columns < 307); the RIGHT 40 % (columns >= 307) is held out.  The held-out
metric is the Dice (sigmoid > 0.5) between the model's prediction on the
held-out strip (the model sees only that strip) and the derived label.

Writes ``samples/checkpoints/vessel_unet2d.pt`` and the sample inputs
``samples/data/retina_crop.png`` (128x128 RGB uint8), its label
``samples/data/retina_crop_vessels.png`` (128x128 uint8 0/255) and
``samples/data/retina_crop2.png`` (a second 128x128 RGB uint8 held-out crop).
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
from scipy import ndimage as ndi  # noqa: E402

if __package__ in (None, ""):  # run as a script: make ``samples`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from samples._common import CHECKPOINT_DIR, DATA_DIR, dice, seed_everything  # noqa: E402
from samples.models import VesselUNet2D  # noqa: E402

CHECKPOINT = os.path.join(CHECKPOINT_DIR, "vessel_unet2d.pt")
CROP_PATH = os.path.join(DATA_DIR, "retina_crop.png")
CROP_LABEL_PATH = os.path.join(DATA_DIR, "retina_crop_vessels.png")
CROP2_PATH = os.path.join(DATA_DIR, "retina_crop2.png")

SIZE = 512
SPLIT_COL = int(0.6 * SIZE)  # 307: columns < SPLIT_COL train, >= SPLIT_COL held out
PATCH = 64
BATCH = 16
ITERS = 400
LR = 3e-3
CROP = 128

# label parameters (documented above)
FOV_RED_THRESHOLD = 0.2
FOV_EROSION_RADIUS = 6
CLAHE_CLIP = 0.01
FRANGI_SIGMAS = range(1, 4)
VESSEL_PERCENTILE = 88
MIN_OBJECT_SIZE = 30


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return (xx ** 2 + yy ** 2) <= radius ** 2


def load_image() -> np.ndarray:
    """The retina photograph as uint8 RGB (512, 512, 3)."""
    from skimage import data, transform

    img = transform.resize(data.retina(), (SIZE, SIZE), anti_aliasing=True)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def fov_mask(image_u8: np.ndarray) -> np.ndarray:
    """Eroded field-of-view mask (bool, H x W)."""
    red = image_u8[..., 0].astype(np.float64) / 255.0
    fov = ndi.binary_opening(red > FOV_RED_THRESHOLD, structure=_disk(3))
    return ndi.binary_erosion(fov, structure=_disk(FOV_EROSION_RADIUS))


def derive_vessel_label(image_u8: np.ndarray) -> np.ndarray:
    """Classical vessel label for an RGB uint8 fundus image (uint8 0/1, H x W)."""
    from skimage import exposure, filters

    img = image_u8.astype(np.float64) / 255.0
    red = img[..., 0]
    fov = ndi.binary_opening(red > FOV_RED_THRESHOLD, structure=_disk(3))
    fov_e = ndi.binary_erosion(fov, structure=_disk(FOV_EROSION_RADIUS))
    inv_green = 1.0 - img[..., 1]
    inv_green[~fov] = np.median(inv_green[fov])
    enhanced = exposure.equalize_adapthist(inv_green, clip_limit=CLAHE_CLIP)
    vesselness = filters.frangi(enhanced, sigmas=FRANGI_SIGMAS, black_ridges=False)
    vesselness[~fov_e] = 0.0
    label = vesselness > np.percentile(vesselness[fov_e], VESSEL_PERCENTILE)
    components, n = ndi.label(label, structure=np.ones((3, 3)))
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    keep = sizes >= MIN_OBJECT_SIZE
    keep[0] = False
    return keep[components].astype(np.uint8)


def load_data():
    """Return ``(image_u8 (512,512,3), label (512,512) uint8 0/1)``."""
    image = load_image()
    return image, derive_vessel_label(image)


def to_tensor(image_u8: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image_u8.transpose(2, 0, 1))).float().div(255.0)[None]


@torch.no_grad()
def predict(model: torch.nn.Module, image_u8: np.ndarray) -> np.ndarray:
    """Binary vessel prediction (sigmoid > 0.5) for an RGB uint8 image."""
    model.eval()
    return (torch.sigmoid(model(to_tensor(image_u8)))[0, 0] > 0.5).numpy()


def heldout_dice(model: torch.nn.Module, image_u8: np.ndarray, label: np.ndarray) -> float:
    """Dice on the held-out right strip (columns >= SPLIT_COL), model sees only that strip."""
    strip = image_u8[:, SPLIT_COL:]
    return dice(predict(model, strip), label[:, SPLIT_COL:])


def _sample_batch(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """Random PATCHxPATCH patches from the training (left) region, with flips."""
    _, _, h, w = x.shape
    rows = torch.randint(0, h - PATCH + 1, (BATCH,), generator=gen).tolist()
    cols = torch.randint(0, w - PATCH + 1, (BATCH,), generator=gen).tolist()
    flips = torch.randint(0, 2, (BATCH, 2), generator=gen).tolist()
    xs, ys = [], []
    for r, c, (fh, fv) in zip(rows, cols, flips):
        xp, yp = x[0, :, r:r + PATCH, c:c + PATCH], y[0, :, r:r + PATCH, c:c + PATCH]
        dims = [d for d, f in ((2, fh), (1, fv)) if f]
        if dims:
            xp, yp = xp.flip(dims), yp.flip(dims)
        xs.append(xp)
        ys.append(yp)
    return torch.stack(xs), torch.stack(ys)


def train(image_u8: np.ndarray, label: np.ndarray) -> VesselUNet2D:
    x = to_tensor(image_u8[:, :SPLIT_COL])
    y = torch.from_numpy(label[:, :SPLIT_COL]).float()[None, None]
    model = VesselUNet2D()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=ITERS, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    running = 0.0
    for it in range(ITERS):
        xb, yb = _sample_batch(x, y, gen)
        logits = model(xb)
        prob = torch.sigmoid(logits)
        soft_dice = 1 - (2 * (prob * yb).sum() + 1) / (prob.sum() + yb.sum() + 1)
        loss = F.binary_cross_entropy_with_logits(logits, yb) + soft_dice
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if (it + 1) % 100 == 0:
            print(f"iter {it + 1:5d}  loss {running / 100:.4f}")
            running = 0.0
    return model


def choose_crops(image_u8: np.ndarray, label: np.ndarray):
    """Two non-overlapping CROPxCROP crops from the held-out strip, fully inside
    the FOV, with the most vessel pixels (grid search, stride 16).
    Returns a list of (row, col) top-left corners."""
    fov = fov_mask(image_u8)
    cands = []
    for r in range(0, SIZE - CROP + 1, 16):
        for c in range(SPLIT_COL, SIZE - CROP + 1, 16):
            if fov[r:r + CROP, c:c + CROP].all():
                cands.append((int(label[r:r + CROP, c:c + CROP].sum()), r, c))
    cands.sort(key=lambda t: (-t[0], t[1], t[2]))
    chosen = [cands[0][1:]]
    for _, r, c in cands[1:]:
        if abs(r - chosen[0][0]) >= CROP or abs(c - chosen[0][1]) >= CROP:
            chosen.append((r, c))
            break
    return chosen


def save_samples(image_u8: np.ndarray, label: np.ndarray) -> None:
    from skimage import io

    os.makedirs(DATA_DIR, exist_ok=True)
    (r1, c1), (r2, c2) = choose_crops(image_u8, label)
    print(f"crop 1 at (row {r1}, col {c1}), crop 2 at (row {r2}, col {c2}) of the 512x512 image")
    io.imsave(CROP_PATH, image_u8[r1:r1 + CROP, c1:c1 + CROP], check_contrast=False)
    io.imsave(CROP_LABEL_PATH, (label[r1:r1 + CROP, c1:c1 + CROP] * 255).astype(np.uint8),
              check_contrast=False)
    io.imsave(CROP2_PATH, image_u8[r2:r2 + CROP, c2:c2 + CROP], check_contrast=False)


def main() -> None:
    t0 = time.time()
    seed_everything()
    image, label = load_data()
    fov = fov_mask(image)
    print(f"vessel fraction in FOV: {label[fov].mean():.3f}")
    model = train(image, label)
    d = heldout_dice(model, image, label)
    print(f"held-out Dice (right 40%, sigmoid > 0.5): {d:.4f}")
    os.makedirs(CHECKPOINT_DIR, exist_ok=True)
    torch.save(model.state_dict(), CHECKPOINT)
    save_samples(image, label)
    print("wrote", os.path.relpath(CHECKPOINT), f"({os.path.getsize(CHECKPOINT)} bytes)")
    print(f"wall time {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
