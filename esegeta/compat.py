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

from esegeta.errors import MethodUnavailable

#: Keeps the declared schemas alive: they vanish when the Library object is collected.
_LIBRARY: Any = None
_LOCK = threading.RLock()
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
        _remove_finder()  # this import is the one the finder would route here
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

        if _LIBRARY is None:
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


class _Finder:
    """A ``sys.meta_path`` entry that routes the first ``import torchvision`` (by anyone: a
    user's factory file, timm, an adapter) through :func:`import_torchvision`, then steps aside."""
    busy = False

    def find_spec(self, name, path=None, target=None):  # noqa: D102 (importlib's protocol)
        if name != "torchvision" or _Finder.busy:
            return None
        _Finder.busy = True
        try:
            _remove_finder()
            import_torchvision()
        except MethodUnavailable:
            return None  # the plain import then raises its own error, as without esegeta
        finally:
            _Finder.busy = False
        module = sys.modules.get("torchvision")
        if module is None:
            return None
        import importlib.util

        return importlib.util.spec_from_loader("torchvision", _Loaded(module))


class _Loaded:
    """A loader that hands back the module :func:`import_torchvision` already imported, with its own spec."""

    def __init__(self, module):
        self.module = module
        self.spec = module.__spec__

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        module.__spec__ = self.spec
        module.__loader__ = self.spec.loader if self.spec is not None else None


_FINDER = _Finder()


def _remove_finder() -> None:
    while _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def ensure_torchvision_importable() -> None:
    """Make a later ``import torchvision`` anywhere in this process work on CPU-only torch.

    Costs nothing until torchvision is imported, and changes nothing when it is already imported,
    not installed, or imports cleanly: the first import goes through :func:`import_torchvision`,
    which declares the missing operator schemas only if that is what breaks it. Called by every
    command and by :func:`esegeta.explain` before a user's code is imported."""
    import importlib.util

    if "torchvision" in sys.modules or _FINDER in sys.meta_path:
        return
    try:
        if importlib.util.find_spec("torchvision") is None:
            return
    except (ImportError, ValueError):
        return
    sys.meta_path.insert(0, _FINDER)
