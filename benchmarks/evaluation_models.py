"""The model and inputs the evaluation benchmarks share: a torchvision classifier (:data:`TORCHVISION`,
random weights) on random RGB images, or the digits sample on its own data."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The torchvision classifiers the benchmarks take (10 classes, random weights).
TORCHVISION = ("resnet18", "mobilenet_v3_small", "densenet121")


def model_and_inputs(name: str, n: int, size: int):
    """``(model, x)`` in eval mode: ``name`` is one of :data:`TORCHVISION` (``n`` inputs of 3×size×size)
    or ``digits``."""
    import esegeta  # noqa: F401 (the torchvision shim first)
    import torch

    torch.manual_seed(0)
    if name in TORCHVISION:
        import torchvision

        return getattr(torchvision.models, name)(num_classes=10).eval(), torch.rand(n, 3, size, size)
    from samples.models import DigitResNet
    from sklearn.datasets import load_digits

    model = DigitResNet().eval()
    model.load_state_dict(torch.load(ROOT / "samples" / "checkpoints" / "digit_resnet.pt", weights_only=True))
    return model, torch.tensor(load_digits().images[:n] / 16.0, dtype=torch.float32)[:, None]
