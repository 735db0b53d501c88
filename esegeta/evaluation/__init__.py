"""Explanation metrics: batched in torch, 2D and 3D, on any device (see :mod:`.base`)."""
from .base import Context, MetricResult, MetricSpec, all_metrics, metric, register

__all__ = ["Context", "MetricResult", "MetricSpec", "all_metrics", "metric", "register"]
