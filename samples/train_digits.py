"""Train :class:`samples.models.DigitResNet` on scikit-learn's digits.

Usage (from the repository root)::

    python samples/train_digits.py

Data: ``sklearn.datasets.load_digits`` (1797 8x8 grey images, values 0..16,
shipped inside scikit-learn).  Preprocessing: float32, divided by 16 -> [0, 1],
shape (N, 1, 8, 8).  Split: ``train_test_split(test_size=0.25, random_state=0,
stratify=y)``.  Writes ``samples/checkpoints/digit_resnet.pt`` and four
held-out sample inputs ``samples/data/digits/digit_<testindex>_label<k>.npy``.
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
import torch.nn as nn  # noqa: E402

if __package__ in (None, ""):  # run as a script: make ``samples`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from samples._common import CHECKPOINT_DIR, DATA_DIR, seed_everything  # noqa: E402
from samples.models import DigitResNet  # noqa: E402

CHECKPOINT = os.path.join(CHECKPOINT_DIR, "digit_resnet.pt")
SAMPLE_DIR = os.path.join(DATA_DIR, "digits")
EPOCHS = 30
BATCH = 64
LR = 3e-3


def load_split():
    """Return ``(x_train, x_test, y_train, y_test)``; x: float32 (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of ``model`` (switched to eval mode) on ``(x, y)``."""
    model.eval()
    pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def train(x_train: np.ndarray, y_train: np.ndarray, epochs: int = EPOCHS, verbose: bool = True) -> DigitResNet:
    model = DigitResNet()
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), BATCH):
            idx = perm[i:i + BATCH]
            xb = xt[idx]
            # light augmentation: random shift by up to 1 pixel
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            opt.zero_grad()
            loss = loss_fn(model(xb), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if verbose and (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  train loss {total / len(xt):.4f}")
    return model


def roar_data():
    """ROAR's data (``evaluation.roar.data``): ``(x_train, x_test, y_train, y_test)`` as above."""
    return load_split()


def roar_train(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
               epochs: int = 10) -> float:
    """ROAR's training callable (``evaluation.roar.train``): a fresh DigitResNet trained on the
    (pixel-removed) training images, its accuracy on the (pixel-removed) test images. Seeded,
    and leaves the process's global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = train(x_train, y_train, epochs=epochs, verbose=False)
    return evaluate(model, x_test, y_test)


def save_samples(x_test: np.ndarray, y_test: np.ndarray, model: nn.Module) -> list:
    """Save 4 correctly-classified held-out digits of different classes."""
    os.makedirs(SAMPLE_DIR, exist_ok=True)
    for f in os.listdir(SAMPLE_DIR):
        if f.endswith(".npy"):
            os.remove(os.path.join(SAMPLE_DIR, f))
    with torch.no_grad():
        pred = model.eval()(torch.from_numpy(x_test)).argmax(1).numpy()
    paths, wanted = [], [0, 3, 7, 8]
    for k in wanted:
        idx = int(np.flatnonzero((y_test == k) & (pred == k))[0])
        p = os.path.join(SAMPLE_DIR, f"digit_{idx}_label{k}.npy")
        np.save(p, x_test[idx].astype(np.float32))  # (1, 8, 8), already / 16
        paths.append(p)
    return paths


def main() -> None:
    t0 = time.time()
    seed_everything()
    x_train, x_test, y_train, y_test = load_split()
    model = train(x_train, y_train)
    acc = evaluate(model, x_test, y_test)
    print(f"held-out accuracy: {acc:.4f} ({len(y_test)} test images)")
    os.makedirs(CHECKPOINT_DIR, exist_ok=True)
    torch.save(model.state_dict(), CHECKPOINT)
    for p in save_samples(x_test, y_test, model):
        print("wrote", os.path.relpath(p))
    print("wrote", os.path.relpath(CHECKPOINT), f"({os.path.getsize(CHECKPOINT)} bytes)")
    print(f"wall time {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
