"""Importing torchvision where its compiled operators cannot load (CPU-only torch).

The registry serves torchvision only as CUDA builds. Next to a CPU-only torch its
compiled library fails to load, and ``torchvision/_meta_registrations.py`` then registers
fake kernels for ``torchvision::nms`` and ``torchvision::qnms``, operators that were never
declared, so ``import torchvision`` itself raises ``RuntimeError: operator torchvision::nms
does not exist``. grad-cam, Lucent, Zennit and TorchRay's excitation backprop import
torchvision, so they all fail with it.

:func:`import_torchvision` first tries the plain import. Only if it fails with exactly
that error does it declare the two operator schemas (what the compiled library would
have declared), so the rest of torchvision (models, transforms) imports and runs;
``torchvision.ops.nms`` and the image/video readers still cannot run, and say so when
called. Nothing is changed when the plain import works.
"""
from __future__ import annotations

import sys
import threading
from typing import Any

from .errors import MethodUnavailable

#: Keeps the declared schemas alive: they vanish when the Library object is collected.
_LIBRARY: Any = None
_LOCK = threading.Lock()
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _forget_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def declared_missing_ops() -> bool:
    """Whether esegeta had to declare torchvision's operator schemas in this process."""
    return _LIBRARY is not None


def import_torchvision():
    """``import torchvision``, declaring its missing operator schemas first if that is what
    breaks the import (CPU-only torch next to a CUDA torchvision); see the module docstring."""
    global _LIBRARY
    with _LOCK:
        if "torchvision" in sys.modules and _LIBRARY is not None:
            return sys.modules["torchvision"]
        try:
            import torchvision

            return torchvision
        except ModuleNotFoundError as exc:
            raise MethodUnavailable("torchvision is not installed: pip install 'torchvision' "
                                    "(pinned to your torch, see constraints.txt)") from exc
        except RuntimeError as exc:
            if "torchvision::nms does not exist" not in str(exc):
                raise MethodUnavailable(f"torchvision cannot be imported: {exc}") from exc
            _forget_torchvision()
        import torch

        library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            library.define(schema)
        _LIBRARY = library
        try:
            import torchvision
        except Exception as exc:  # still broken: say what, and what was tried
            _forget_torchvision()
            raise MethodUnavailable(
                f"torchvision cannot be imported even with its missing operators declared: {type(exc).__name__}: "
                f"{exc}; install a torchvision built for this torch") from exc
        return torchvision
