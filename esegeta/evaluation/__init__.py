"""Explanation metrics: batched in torch, 2D and 3D, on any device (see :mod:`.base`).

- :mod:`.base`: the metric interface (:class:`Context`, :class:`MetricResult`,
  :class:`MetricSpec`) and registry (:func:`all_metrics`, :func:`metric`); the metric modules
  (faithfulness, road, randomisation, localisation, robustness, complexity) register into it.
- :mod:`.settings`: the config's ``evaluation`` block (pydantic; imports nothing else).
- :mod:`.scoring`: the forward a metric perturbs on the user's own model (a wrapped
  segmenter's score with masks frozen on the unperturbed input, the stitched forward of
  global patch mode) and the ``explain`` callable that re-runs an esegeta method.
- :mod:`.run`: evaluation of saved attributions (inside ``esegeta run`` or alone,
  ``esegeta evaluate``), :func:`evaluate` in Python; :mod:`.ranking`: ranks, Kendall τ and the
  output files; :mod:`.roar`: ROAR with retraining; :mod:`.quantus`: an ``explain_func`` for Quantus.

Importing this package imports neither torch nor a metric: names load on first use.
"""
from __future__ import annotations

__all__ = ["Context", "MetricResult", "MetricSpec", "all_metrics", "metric", "register", "evaluate"]

_LAZY = {name: "base" for name in ("Context", "MetricResult", "MetricSpec", "all_metrics", "metric", "register")}
_LAZY["evaluate"] = "run"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
