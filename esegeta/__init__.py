"""esegeta: explainability meta-package for PyTorch.

Many attribution methods (Captum first) behind one JSON method spec, for classification
and segmentation models, 2D and 3D::

    import esegeta
    attr = esegeta.explain(model, x, "captum.IntegratedGradients", target=3, n_steps=32)
    result = esegeta.Pipeline("configs/retina.json").run()
    esegeta.methods()
    scores = esegeta.evaluate(model, x, {"captum.Saliency": attr}, ["deletion", "sparseness"])
    rows = esegeta.summaries(attr, labels)   # relevance per region of a label map and per channel

Importing esegeta imports no explainer library (nor torch): names load on first use.
"""
from __future__ import annotations

from esegeta import moved as _moved
from esegeta.version import __version__
__all__ = ["explain", "evaluate", "summaries", "Pipeline", "RunResult", "methods", "ConfigError", "EsegetaError", "__version__"]

_LAZY = {
    "explain": ("esegeta.attribution.explainer", "explain"),
    "evaluate": ("esegeta.run.runner", "evaluate"),
    "summaries": ("esegeta.attribution.summaries", "summaries"),
    "Pipeline": ("esegeta.run.runner", "Pipeline"),
    "RunResult": ("esegeta.run.runner", "RunResult"),
    "ConfigError": ("esegeta.errors", "ConfigError"),
    "EsegetaError": ("esegeta.errors", "EsegetaError"),
}


def _torchvision_shim() -> None:
    from esegeta.compat import ensure_torchvision_importable

    ensure_torchvision_importable()


_torchvision_shim()  # a later `import torchvision` works on CPU-only torch too (see esegeta.compat)
_moved.install()  # `import esegeta.store` and the other names before the package layout still work


def methods() -> list[dict]:
    """The registry as ``esegeta methods --json`` shows it: one dict per method."""
    from esegeta.spec.registry import all_methods

    return [spec.row() for spec in all_methods().values()]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'esegeta' has no attribute {name!r}")
