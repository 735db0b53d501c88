"""Explanation metrics: batched in torch, 2D and 3D, on any device (see :mod:`.base`).

- :mod:`.base`: the metric interface (:class:`Context`, :class:`MetricResult`,
  :class:`MetricSpec`) and registry (:func:`all_metrics`, :func:`metric`); the metric modules
  (faithfulness, road, randomisation, localisation, robustness, complexity) register into it.
- :mod:`.scoring`: the forward a metric perturbs on the user's own model (a wrapped
  segmenter's score with masks frozen on the unperturbed input, the stitched forward of
  global patch mode) and the ``explain`` callable that re-runs an esegeta method.
- :mod:`.engine`: the metrics of a block on saved attributions (the scoring loop), and
  :func:`evaluate` on tensors; :mod:`.catalogue`: the metrics as ``esegeta metrics`` lists them;
  :mod:`.ranking`: ranks, Kendall τ and the output files; :mod:`.roar`: ROAR with retraining;
  :mod:`.quantus`: an ``explain_func`` for Quantus. The config's ``evaluation`` block is
  :mod:`esegeta.spec.evaluation`; running it after a run (or alone, ``esegeta evaluate``) is
  :mod:`esegeta.run.evaluate`'s: this package imports nothing from ``esegeta.run``.

Importing this package imports neither torch nor a metric: names load on first use.
"""
from __future__ import annotations

__all__ = ["Context", "MetricResult", "MetricSpec", "all_metrics", "metric", "register", "evaluate"]

_LAZY = {name: "base" for name in ("Context", "MetricResult", "MetricSpec", "all_metrics", "metric", "register")}
_LAZY["evaluate"] = "engine"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
