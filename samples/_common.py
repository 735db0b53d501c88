"""Shared helpers for the sample training scripts: seeding, paths, Dice."""

import os
import random

import numpy as np
import torch

SEED = 0
SAMPLES_DIR = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT_DIR = os.path.join(SAMPLES_DIR, "checkpoints")
DATA_DIR = os.path.join(SAMPLES_DIR, "data")


def seed_everything(seed: int = SEED, threads: int = 2) -> None:
    """Seed python, numpy and torch; fix the thread count; deterministic ops."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def dice(pred: np.ndarray, target: np.ndarray, eps: float = 1e-8) -> float:
    """Dice coefficient of two binary masks (1.0 when both are empty)."""
    pred = np.asarray(pred, dtype=bool)
    target = np.asarray(target, dtype=bool)
    denom = pred.sum() + target.sum()
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(pred, target).sum() / (denom + eps))
