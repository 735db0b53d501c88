"""The config's ``evaluation`` block: which metrics score the run's attributions, and how.

Structure only (pydantic, no other import); what needs the metric registry or the run's
methods (metric ids, parameter names, method labels, mask files, the ROAR training callable)
is checked by :func:`esegeta.evaluation.engine.problems`, each fault naming its JSON path, e.g.
``evaluation.metrics[1].params.step: metric deletion has no parameter 'step'; did you mean steps?``.

Example::

    "evaluation": {
      "metrics": ["deletion", {"id": "pixel_flipping", "params": {"features_in_step": 16}}, "sparseness"],
      "overrides": {"captum.Occlusion": {"deletion": {"steps": 10}}, "lime": {"max_sensitivity": false}},
      "max_batch": 32
    }
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator


class _Strict(BaseModel):
    """No unknown keys, no type coercion (``"64"`` is not 64, ``1`` is not true), as the rest of the config."""
    model_config = ConfigDict(extra="forbid", strict=True)


class MetricEntry(_Strict):
    """One metric with its parameters (names as ``esegeta metrics --json`` lists them)."""
    id: str = Field(description="a metric id, see `esegeta metrics`")
    params: dict[str, Any] = Field(default_factory=dict, description="the metric's parameters (defaults otherwise)")


class RoarConfig(_Strict):
    """ROAR (remove and retrain): the top fraction of each training and test image by the
    method's attribution is replaced by the image mean, a fresh model is trained, then tested."""
    train: str = Field(description="'file.py:callable' (relative to the config): train(x_train, y_train, x_test, "
                       "y_test, **options) -> test score (e.g. accuracy, higher is better) of a freshly trained model")
    data: str = Field(description="'file.py:callable': () -> (x_train, x_test, y_train, y_test) arrays, "
                      "x as (N, C, *spatial) in the model's input form")
    fractions: list[Annotated[float, Field(gt=0, lt=1)]] = Field([0.1, 0.3, 0.5, 0.7, 0.9], min_length=1,
                                                                 description="fractions of pixels removed")
    methods: list[str] | None = Field(None, description="method labels to retrain for (default: every method)")
    max_images: Annotated[int, Field(gt=0)] | None = Field(None, description="use at most this many training "
                                                           "and test images (a quick run)")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the training callable "
                                    "(e.g. epochs)")


class EvaluationConfig(_Strict):
    """Score the run's saved attributions: per (method, input, metric) values, a ranking of
    the methods with the agreement between metrics (Kendall τ), curves for plots."""
    metrics: list[MetricEntry] = Field(min_length=1, description="metric ids, or {id, params}")
    overrides: dict[str, dict[str, dict[str, Any] | StrictBool]] = Field(
        default_factory=dict, description="per method label: {metric id: parameters for this method, or false "
                                          "to skip the metric for it}")
    masks: list[str] | None = Field(None, description="localisation ground truth: mask files (paths, globs or "
                                    "folders), one per input in the inputs' order; default: a wrapper's frozen "
                                    "mask of the target")
    max_batch: Annotated[int, Field(gt=0)] | None = Field(
        None, description="perturbed inputs per forward call; default: 64, and on the CPU at most 8 RGB 224² "
                          "images' worth of values per call (bigger batches of big inputs are slower there)")
    seed: int = Field(0, description="seeds every random draw of the metrics")
    inference_copy: StrictBool = Field(True, description="score the perturbed inputs on the CPU with one copy of "
                                       "the model made for the evaluation, BatchNorms folded into the convolutions "
                                       "and weights channels last (faster; costs one more copy of the weights), "
                                       "where it pays off: inputs of 3x128x128 values or more, 16 passes in all")
    enabled: StrictBool = Field(True, description="evaluate inside `esegeta run` (`esegeta evaluate` always does)")
    roar: RoarConfig | None = Field(None, description="also run ROAR with retraining (slow: one training per "
                                    "method and fraction)")

    @field_validator("metrics", mode="before")
    @classmethod
    def _ids(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"id": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("overrides")
    @classmethod
    def _no_true(cls, value: dict) -> dict:
        for label, metrics in value.items():
            for metric_id, setting in metrics.items():
                if setting is True:
                    raise ValueError(f"{label}.{metric_id}: give parameters ({{...}}) or false (skip); "
                                     "true changes nothing")
        return value

    def metric_ids(self) -> list[str]:
        return [m.id for m in self.metrics]


__all__ = ["EvaluationConfig", "MetricEntry", "RoarConfig"]
