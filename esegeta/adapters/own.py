"""esegeta's own methods: the few that no installed library ships (``esegeta.<Name>``).

One generic adapter serves the whole table: each method is a function
``esegeta.algorithms.<module>.<function>(call, *, <params>)`` whose keyword parameters *are*
the config's ``params`` (their names, defaults and documentation). The implementations
are imported on first use, so listing the registry imports neither torch nor them.

Of TorchEsegeta's CNN visualisations, the others have a home upstream: vanilla backprop is
``captum.Saliency``, gradient × image ``captum.InputXGradient``, guided Grad-CAM
``captum.GuidedGradCam``, Score-CAM ``gradcam.ScoreCAM``, deep dream and layer visualisation
``lucent.render_vis``; only "layer activation with guided backprop" needed a method here.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

from esegeta.errors import ConfigError
from esegeta.spec.params import boolean, channels_of_layer, index, positive_int
from esegeta.spec import cost
from esegeta.spec.cost import Passes
from esegeta.spec.registry import PER_INPUT, ROWS, Call, Library, MethodSpec, register

#: esegeta's own methods: they may draw from any RNG and fit on the run's samples (PatternNet).
LIBRARY = Library("esegeta", None, "", (), batch_params={"batch_size": None})

#: method name → "module:function" (in :mod:`esegeta.algorithms`).
IMPLEMENTATIONS: dict[str, str] = {}


def _check_channel(value: Any, path: str) -> None:
    if value is not None and not index(value):
        raise ConfigError(path, f"{value!r} is not a channel index: give an integer >= 0, or null for the most "
                                "active channel")


def _check_pattern_type(value: Any, path: str) -> None:
    if value not in ("relu", "linear"):
        raise ConfigError(path, f"{value!r} is not a pattern estimator: use 'relu' (two-component, a+) or 'linear'")


def _check_fit_inputs(value: Any, path: str) -> None:
    if (hasattr(value, "ndim") and hasattr(value, "shape")) or value == "samples":  # a tensor: Python API only
        return
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return
    if isinstance(value, dict) and isinstance(value.get("paths"), list) and value["paths"]:
        unknown = set(value) - {"paths", "color", "normalize", "resize"}
        if unknown:
            raise ConfigError(path, f"unknown key(s) {sorted(unknown)}: fit_inputs takes paths, color, normalize "
                                    "and resize, as the 'inputs' block does")
        return
    raise ConfigError(path, f"{value!r} is not 'samples' (the run's inputs), a list of files/globs, or an object "
                            "{'paths': [...], 'normalize': ...} like 'inputs'")


def _check_patterns(value: Any, path: str) -> None:
    if value is not None and not (isinstance(value, str) and value.endswith((".pt", ".pth"))):
        raise ConfigError(path, f"{value!r} is not a .pt file name: give e.g. 'patterns/model.pt' (relative to "
                                "the config's folder), or null to fit without saving")


def _check_batch_size(value: Any, path: str) -> None:
    if not positive_int(value):
        raise ConfigError(path, f"{value!r} is not a batch size: give an integer >= 1")


def _check_bool(value: Any, path: str) -> None:
    if not boolean(value):
        raise ConfigError(path, f"{value!r} is not true or false")


def _check_conditions(value: Any, path: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(isinstance(v, list) and v and all(index(c) for c in v)
                                              for v in value.values()):
        raise ConfigError(path, f"{value!r} is not {{layer: [channels]}}: give each conditioned layer a list of channel "
                                "indices, layers ordered from the output towards the input")


def _check_index(value: Any, path: str) -> None:
    if not index(value):
        raise ConfigError(path, f"{value!r} is not an integer >= 0")


def _check_count(value: Any, path: str) -> None:
    if not positive_int(value):
        raise ConfigError(path, f"{value!r} is not a count: give an integer >= 1")


def _check_positive(value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(path, f"{value!r} is not a positive number")


#: parameter name → check of its JSON value (run before anything else).
CHECKS: Mapping[str, Callable[[Any, str], None]] = {
    "channel": _check_channel,
    "pattern_type": _check_pattern_type,
    "fit_inputs": _check_fit_inputs,
    "patterns": _check_patterns,
    "batch_size": _check_batch_size,
    "project_bottlenecks": _check_bool,
    "sqrt": _check_bool,
    "steps": _check_count,
    "x_steps": _check_count,
    "top_k": _check_count,
    "conditions": _check_conditions,
    "dilation_rad": _check_index,
    "min_pixel_diff": _check_index,
    "max_sigma": _check_positive,
    "grad_step": _check_positive,
}


@cache
def _keyword_parameters(fn: Callable) -> Mapping[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}


class OwnAdapter:
    """Calls esegeta's implementation of a method with the config's params."""
    @staticmethod
    def _function(spec: MethodSpec) -> Callable:
        module, _, name = IMPLEMENTATIONS[spec.name].partition(":")
        return getattr(importlib.import_module(module), name)

    def parameters(self, spec: MethodSpec) -> Mapping[str, inspect.Parameter]:
        return _keyword_parameters(self._function(spec))

    def check_value(self, name: str, value: Any, path: str) -> None:
        check = CHECKS.get(name)
        if check is not None:
            check(value, path)

    def run(self, spec: MethodSpec, call: Call):
        return self._function(spec)(call, **call.params)


ADAPTER = OwnAdapter()


def _fit_quick(x):
    """Conformance-test fitting data: the input and 7 noisy copies of it (one input alone gives a
    dense layer no variance to estimate a pattern from). Seeded, so runs repeat."""
    import torch

    # drawn on the CPU on purpose, then put on x's device: the same fitting data on every
    # device, so the CUDA lane can compare patterns fitted there with the CPU's
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((7, *x.shape[1:]), generator=generator).to(x)
    return torch.cat([x[:1], x[:1] + 0.1 * x.std() * noise])


def _patterns_preflight(method: str):
    def preflight(model, context=None) -> list[str]:
        from esegeta.algorithms.patterns import unsupported

        return unsupported(model, context, f"esegeta.{method}")
    return preflight


def _cam_preflight(model, context=None) -> list[str]:
    """esegeta.CAM's check: the model must end in global average pooling and a linear layer, at the layer."""
    from esegeta.algorithms.cam import head
    from esegeta.errors import ConfigError

    if context is None or context.layer is None:
        return []
    try:
        head(model, model.get_submodule(context.layer), context.x[:1])
    except ConfigError as exc:
        return [exc]  # names its own field (layer or model)
    except AttributeError:
        return []
    return []


def _xrai_passes(values, x, layer_shape) -> Passes:
    """Integrated gradients from two baselines (black and white): ``steps`` rows each way per baseline."""
    steps = values.get("steps")
    return Passes(2 * int(steps), 2 * int(steps)) if cost.count(steps) else Passes(None, None, False, "steps not known")


def _patterns_passes(values, x, layer_shape) -> Passes:
    return Passes(1, 1, False, "plus one forward pass over the fitting inputs, once per run")


def _own(name, implementation, *, passes, layout, axiom, kind="attribution", layer=False, target=True, tasks=None,
         requires=(), extra="", quick=None, ref="", preflight=None):
    IMPLEMENTATIONS[name] = f"esegeta.algorithms.{implementation}"
    register(MethodSpec(
        library=LIBRARY, name=name, kind=kind, adapter=ADAPTER, requires=requires, extra=extra,
        needs_layer=layer, needs_target=target, quick_params=quick or {}, reference=ref,
        **({"tasks": tasks} if tasks else {}), preflight=preflight, passes=passes, batch_layout=layout, axiom=axiom,
    ))


_PATTERN_REF = "Kindermans et al. 2018, ICLR, arXiv:1705.05598"
# Each runs one input per call and keeps no axiom; CAM reads activations only, the others take one
# gradient (PatternNet and PatternAttribution after fitting their patterns once per run).
_own("CAM", "cam:cam", passes=cost.forward_only, layout=PER_INPUT, axiom="none", kind="layer", layer=True,
     tasks=("classification",), ref="Zhou et al. 2016, CVPR, arXiv:1512.04150", preflight=_cam_preflight)
_own("PatternNet", "patterns:pattern_net", passes=_patterns_passes, layout=PER_INPUT, axiom="none",
     quick={"fit_inputs": _fit_quick}, ref=_PATTERN_REF, preflight=_patterns_preflight("PatternNet"))
_own("PatternAttribution", "patterns:pattern_attribution", passes=_patterns_passes, layout=PER_INPUT, axiom="none",
     quick={"fit_inputs": _fit_quick}, ref=_PATTERN_REF, preflight=_patterns_preflight("PatternAttribution"))
_own("LayerActivationGuidedBackprop", "guided:layer_activation_guided_backprop", passes=cost.gradient,
     layout=PER_INPUT, axiom="none", layer=True, target=False, requires=("captum",), extra="captum",
     ref="Springenberg et al. 2015, arXiv:1412.6806", preflight=channels_of_layer("channel"))
# Blur IG: PAIR's saliency cannot be an extra (numpy, channels-last, 2D): its algorithm in torch, N-d. A call
# tiles the path's points of its inputs (k·B rows), but the slopes divide the blurs' rounding by grad_step (0.01):
# a wrapped batch of the three retina crops (tests/test_batching.py) differs from input by input by 1.4e-3 at a
# few pixels, beyond that test's tolerance: one input per call.
_own("BlurIG", "blur_ig:blur_ig", passes=cost.steps("steps"), layout=PER_INPUT, axiom="none",
     quick={"steps": 4, "max_sigma": 2}, ref="Xu et al. 2020, arXiv:2004.03383 (PAIR saliency 0.2.1's BlurIG)")
# Guided IG: PAIR's numpy implementation fails on NumPy 2 (np.quantile's removed interpolation=): its steps in torch.
_own("GuidedIG", "guided_ig:guided_ig", passes=cost.steps("x_steps"), layout=PER_INPUT, axiom="none",
     quick={"x_steps": 4}, ref="Kapishnikov et al. 2021, CVPR, arXiv:2106.09788 (PAIR saliency 0.2.1's GuidedIG)")
# XRAI: PAIR's numpy XRAI is 2D and channels-last; its IG, regions and greedy ranking on tensors, Felzenszwalb
# segments in 2D (upstream's), SLIC supervoxels in 3D; two IG paths of ``steps`` points.
_own("XRAI", "xrai:xrai", passes=_xrai_passes, layout=PER_INPUT, axiom="none",
     quick={"steps": 4, "dilation_rad": 1, "min_pixel_diff": 4},
     ref="Kapishnikov et al. 2019, ICCV, arXiv:1906.02825 (PAIR saliency 0.2.1's XRAI)")

# CRP: zennit-crp pins zennit<=0.4.6; its channel-concept conditional attribution on zennit >= 0.5, one
# modified forward and backward of the batch as given (rows).
_own("CRP", "crp:crp", passes=cost.gradient, layout=ROWS, axiom="none", requires=("zennit",), extra="zennit",
     ref="Achtibat et al. 2023, Nat. Mach. Intell., arXiv:2206.03208 (zennit-crp 0.6's CondAttribution)")
