"""LIME for images (https://github.com/marcotcr/lime; Ribeiro et al. 2016, arXiv:1602.04938).

``lime.LimeImageExplainer``: ``LimeImageExplainer(kernel_width, verbose, feature_selection,
random_state).explain_instance(image, classifier_fn, labels=(target,), top_labels=None, ...)``,
with the config's params under LIME's names. The result is LIME's weight of each segment
for the target (``explanation.local_exp[target]``) painted onto ``explanation.segments``:
float32 ``(B, 1, *spatial)``; segments LIME left out (``num_features``) are 0.

Glue:
- ``classifier_fn`` gets numpy ``(N, *spatial, 3)`` batches and returns the model's scores
  (the wrapped scores with a wrapper: sums over masks, not probabilities) as they are: LIME
  regresses on whatever ``classifier_fn`` returns, no softmax is applied.
- LIME needs RGB: a one-channel input is given as its RGB view (three identical channels, what
  LIME's own ``gray2rgb`` makes), averaged back to one channel before the model sees it.
- ``segmentation_fn`` is ``"quickshift"``, ``"slic"``, ``"felzenszwalb"`` or
  ``{"algo_type": ..., **scikit-image kwargs}`` (LIME's ``SegmentationAlgorithm``); default:
  LIME's own quickshift (kernel_size 4, max_dist 200, ratio 0.2: one segment on very small
  images) in 2D, SLIC in 3D. SLIC is run with ``start_label=0`` (LIME numbers segments from 0;
  scikit-image's SLIC would start at 1). Images outside [0, 1] are min-max scaled for the
  segmentation only (quickshift and SLIC convert RGB to Lab, which assumes [0, 1]).
- 3D: supervoxels, SLIC on the whole volume (``channel_axis=None`` for one channel), not slice
  by slice; quickshift and felzenszwalb are 2D-only. ``explain_instance`` itself takes the
  volume (its sampling, ``data_labels`` and the ``LimeBase`` regression are rank-agnostic), so
  the 3D path is the same upstream call with a supervoxel ``segmentation_fn``.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from functools import cache
from typing import Any

from esegeta.errors import ConfigError, did_you_mean
from esegeta.spec.params import BOOL, POSITIVE_INT, Check, check_table, number, seed
from esegeta.spec import cost
from esegeta.spec.registry import PER_INPUT, Call, Library, MethodSpec, keyword_parameters, register

#: LIME samples with numpy's global RNG (its own ``random_state`` when set).
LIBRARY = Library("lime", "lime", "lime", ("lime", "skimage"), batch_params={"batch_size": None},
                  step_params=("num_samples",), reference="Ribeiro et al. 2016, arXiv:1602.04938")

#: Upstream arguments a config cannot set: esegeta supplies them, or they take Python objects.
NOT_CONFIGURABLE = frozenset({"self", "kernel", "image", "classifier_fn", "labels", "top_labels", "model_regressor"})
ALGORITHMS = ("quickshift", "slic", "felzenszwalb")
#: scikit-image arguments LIME or esegeta supplies.
SEGMENTATION_FIXED = frozenset({"image", "mask", "start_label"})
#: Without params.segmentation_fn: LIME's own default in 2D (what explain_instance builds), SLIC in 3D.
DEFAULT_SEGMENTATION = {2: ("quickshift", {"kernel_size": 4, "max_dist": 200, "ratio": 0.2}), 3: ("slic", {})}
FEATURE_SELECTION = ("auto", "none", "forward_selection", "lasso_path", "highest_weights")


#: name → (check, what a valid value is), checked before anything runs.
CHECKS: Mapping[str, Check] = {
    "num_samples": POSITIVE_INT,
    "num_features": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "random_state": (seed, "a non-negative integer or null"),
    "random_seed": (seed, "a non-negative integer or null"),
    "kernel_width": (lambda v: number(v) and v > 0, "a positive number"),
    "verbose": BOOL,
    "feature_selection": (lambda v: v in FEATURE_SELECTION, f"one of {', '.join(FEATURE_SELECTION)}"),
    "distance_metric": (lambda v: isinstance(v, str), "a scikit-learn metric name, e.g. 'cosine'"),
    "hide_color": (lambda v: v is None or number(v) or (isinstance(v, list) and len(v) == 3 and all(map(number, v))),
                   "null (each segment's mean colour), a number, or 3 numbers"),
}


def _lime_image():
    from lime import lime_image

    return lime_image


def _configurable(fn) -> dict[str, inspect.Parameter]:
    return keyword_parameters(fn, NOT_CONFIGURABLE)


def _algorithm_parameters(algo: str) -> set[str]:
    import skimage.segmentation

    return set(inspect.signature(getattr(skimage.segmentation, algo)).parameters) - SEGMENTATION_FIXED


def _split_segmentation(value: Any, path: str) -> tuple[str, dict[str, Any]]:
    """``segmentation_fn`` as (algorithm, kwargs); ConfigError naming the fix for a bad value."""
    if isinstance(value, str):
        algo, kwargs = value, {}
    elif isinstance(value, dict) and isinstance(value.get("algo_type"), str):
        algo, kwargs = value["algo_type"], {k: v for k, v in value.items() if k != "algo_type"}
        path = f"{path}.algo_type"
    else:
        raise ConfigError(path, f"write segmentation_fn as one of {', '.join(ALGORITHMS)}, or "
                                '{"algo_type": "slic", "n_segments": 50, ...} with scikit-image keyword arguments')
    if algo not in ALGORITHMS:
        raise ConfigError(path, f"unknown segmentation {algo!r}" + did_you_mean(algo, ALGORITHMS))
    allowed = _algorithm_parameters(algo)
    for name in kwargs:
        if name not in allowed:
            raise ConfigError(f"{path.removesuffix('.algo_type')}.{name}",
                              f"skimage.segmentation.{algo} has no parameter {name!r}" + did_you_mean(name, allowed))
    return algo, kwargs


def _segmentation_fn(value: Any, dims: int, channels: int, path: str):
    """The ``segmentation_fn`` for ``explain_instance`` (a scikit-image algorithm through LIME's wrapper)."""
    import numpy as np
    from lime.wrappers.scikit_image import SegmentationAlgorithm

    from esegeta.attribution.backgrounds import for_segmentation

    if value is None:
        algo, kwargs = DEFAULT_SEGMENTATION[dims]
    else:
        algo, kwargs = _split_segmentation(value, path)
    if dims == 3 and algo != "slic":
        raise ConfigError(path, f"{algo} segments 2D images only; use 'slic' (supervoxels) for a 3D input")
    if algo == "slic":
        kwargs = {"start_label": 0, **kwargs}
        if dims == 3:
            kwargs.setdefault("channel_axis", None if channels == 1 else -1)
    algorithm = SegmentationAlgorithm(algo, **kwargs)
    grey_volume = dims == 3 and channels == 1

    def segment(image: np.ndarray) -> np.ndarray:
        return algorithm(for_segmentation(image[..., 0] if grey_volume else image))

    return segment


class LimeAdapter:
    """``lime_image.LimeImageExplainer`` on one input at a time, for its target."""
    @cache  # noqa: B019 (one adapter object for the process)
    def parameters(self, spec: MethodSpec) -> Mapping[str, inspect.Parameter]:
        cls = _lime_image().LimeImageExplainer
        return {**_configurable(cls.__init__), **_configurable(cls.explain_instance)}

    def check_value(self, name: str, value: Any, path: str) -> None:
        if name == "segmentation_fn":
            if value is not None:
                _split_segmentation(value, path)
        else:
            check_table(CHECKS, name, value, path)

    def run(self, spec: MethodSpec, call: Call):
        import torch

        return torch.cat([self._explain(call, call.inputs[i:i + 1], call.targets[i])
                          for i in range(call.inputs.shape[0])])

    def _explain(self, call: Call, x, target: int):
        import numpy as np

        from esegeta.attribution.backgrounds import numpy_model, paint, to_channels_last

        channels, dims = x.shape[1], x.ndim - 2
        if channels not in (1, 3):
            raise ValueError(f"LIME explains RGB or one-channel images; this input has {channels} channels")
        cls = _lime_image().LimeImageExplainer
        params = dict(call.params)
        if isinstance(params.get("hide_color"), list):
            params["hide_color"] = tuple(params["hide_color"])
        segmentation = _segmentation_fn(params.pop("segmentation_fn", None), dims, channels, "params.segmentation_fn")
        init_names = set(inspect.signature(cls.__init__).parameters)
        explainer = cls(**{k: v for k, v in params.items() if k in init_names})
        image = to_channels_last(x)[0]
        if channels == 1:
            image = np.repeat(image, 3, axis=-1)  # LIME's gray2rgb, for 2D and 3D alike
        explanation = explainer.explain_instance(
            image, numpy_model(call.forward, channels, x.device), labels=(target,), top_labels=None,
            segmentation_fn=segmentation, **{k: v for k, v in params.items() if k not in init_names})
        return paint(explanation.segments, dict(explanation.local_exp[target]), x)


ADAPTER = LimeAdapter()

register(MethodSpec(
    library=LIBRARY, name="LimeImageExplainer", kind="attribution", adapter=ADAPTER,
    quick_params={"num_samples": 50, "batch_size": 50},
    reference="Ribeiro et al. 2016, arXiv:1602.04938",
    # one forward row per perturbed sample (segments switched off); random samples: one input per call
    passes=cost.forward_steps("num_samples"), batch_layout=PER_INPUT, axiom="none",
))
