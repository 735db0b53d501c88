"""Old module names (before the package layout of wave 3) as aliases of their new homes.

``import esegeta.store`` still gives :mod:`esegeta.io.store`, with a ``DeprecationWarning`` naming
the new place; nothing inside esegeta uses these names (``tests/test_layout.py`` sees to it).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "esegeta.architectures": "esegeta.attribution.architectures",
    "esegeta.backends": "esegeta.run.backends",
    "esegeta.backends.ray": "esegeta.run.backends.ray",
    "esegeta.backgrounds": "esegeta.attribution.backgrounds",
    "esegeta.baselines": "esegeta.attribution.baselines",
    "esegeta.batching": "esegeta.attribution.batching",
    "esegeta.call": "esegeta.attribution.call",
    "esegeta.check": "esegeta.run.check",
    "esegeta.config": "esegeta.spec.config",
    "esegeta.cost": "esegeta.spec.cost",
    "esegeta.datasets": "esegeta.io.datasets",
    "esegeta.evaluation.cli": "esegeta.evaluation.catalogue",
    "esegeta.evaluation.run": "esegeta.run.evaluate",
    "esegeta.evaluation.settings": "esegeta.spec.evaluation",
    "esegeta.executor": "esegeta.run.executor",
    "esegeta.explainer": "esegeta.attribution.explainer",
    "esegeta.explorer": "esegeta.show.explorer",
    "esegeta.figures": "esegeta.show.figures",
    "esegeta.guard": "esegeta.attribution.guard",
    "esegeta.loading": "esegeta.io.loading",
    "esegeta.numerics": "esegeta.attribution.numerics",
    "esegeta.outputs": "esegeta.io.outputs",
    "esegeta.params": "esegeta.spec.params",
    "esegeta.patcher": "esegeta.attribution.patcher",
    "esegeta.planning": "esegeta.run.plan",
    "esegeta.prepare": "esegeta.attribution.prepare",
    "esegeta.progress": "esegeta.run.progress",
    "esegeta.registry": "esegeta.spec.registry",
    "esegeta.report": "esegeta.show.report",
    "esegeta.request": "esegeta.spec.request",
    "esegeta.resume": "esegeta.io.resume",
    "esegeta.runner": "esegeta.run.runner",
    "esegeta.scheduling": "esegeta.attribution.scheduling",
    "esegeta.signatures": "esegeta.spec.signatures",
    "esegeta.store": "esegeta.io.store",
    "esegeta.targets": "esegeta.spec.targets",
    "esegeta.timeouts": "esegeta.run.timeouts",
    "esegeta.torchesegeta": "esegeta.cli.torchesegeta",
    "esegeta.values": "esegeta.spec.values",
    "esegeta.verdicts": "esegeta.attribution.verdicts",
    "esegeta.wrappers": "esegeta.attribution.wrappers",
    "esegeta.writer": "esegeta.run.writer",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and hands out the module of its new name (one module object, both names)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; import it from there", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
