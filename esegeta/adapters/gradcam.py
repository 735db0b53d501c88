"""pytorch-grad-cam (PyPI ``grad-cam``, https://github.com/jacobgil/pytorch-grad-cam): every CAM class.

One generic adapter serves the whole table, with upstream's calling convention:
``cam = Cls(model=call.forward, target_layers=[call.layer], **init_params)`` and
``cam(input_tensor=x, targets=[ClassifierOutputTarget(t) per input], **call_params)``
(FullGrad takes no layer: it uses every biased Conv2d/BatchNorm2d; RefineCAM takes the entry's
list of layers as ``target_layers``).

Segmentation: with a wrapper, ``call.forward`` is the wrapped model whose column ``k`` is
``sum(act(out)_k · M_k)`` over the mask frozen on the unperturbed input, so
``ClassifierOutputTarget(k)`` on it is upstream's ``SemanticSegmentationTarget(k, M)`` on the
raw output (``activation: none``) or on ``sigmoid``/``softmax`` of it (tests prove both).

The result is upstream's CAM as upstream computes it: ReLU'd, scaled to [0, 1] per input
and resized to the input size (numpy ``(B, *spatial)``), returned as a float32 tensor
``(B, 1, *spatial)``: a channel axis of 1 added. Hooks are released; what a CAM
leaves (the layer AblationCAM swaps in, hooks of a constructor that failed half-way) is undone
by the one guard (:func:`esegeta.attribution.guard.run_guarded`); everything runs on the prepared copy.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Mapping
from functools import cache
from typing import Any

from esegeta.errors import ConfigError, did_you_mean
from esegeta.hooks import removing
from esegeta.spec.params import BOOL, POSITIVE_INT, Check, check_table, number, positive_int
from esegeta.spec import cost
from esegeta.spec.cost import Passes
from esegeta.spec.registry import PER_INPUT, ROWS, Call, Library, MethodSpec, keyword_parameters, register

log = logging.getLogger("esegeta")

#: pytorch-grad-cam draws from torch's RNG only (RandomCAM and KPCA_CAM also from numpy's: see the table).
LIBRARY = Library("gradcam", "grad-cam", "gradcam", ("pytorch_grad_cam",), uses_global_rng=False,
                  reads_samples=False, batch_params={"batch_size": None},
                  reference="Gildenblat et al., https://github.com/jacobgil/pytorch-grad-cam")
#: Methods that draw from numpy's global RNG (random channel weights; sklearn's KernelPCA).
GLOBAL_RNG = frozenset({"RandomCAM", "KPCA_CAM"})

#: Upstream arguments a JSON config cannot set: esegeta supplies them, or they take Python objects.
NOT_CONFIGURABLE = frozenset({
    "self", "model", "target_layers", "ablation_layer", "tta_transforms",
    "input_tensor", "targets", "target_idx", "compute_input_gradient", "uses_gradients", "detach",
})
#: Methods that take the explained class as ``target_idx`` (they build their own targets from it).
TARGET_INDEX = frozenset({"FinerCAM"})
#: Settings upstream reads from an attribute set after construction, not from a keyword.
ATTRIBUTES: Mapping[str, Mapping[str, Any]] = {"ScoreCAM": {"batch_size": 16}}
#: Parameters whose value is the name of another CAM class (meta-methods).
CLASS_PARAMS = frozenset({"base_method"})
#: Objects upstream takes as a default instance shared by every call: each call gets its own.
FRESH: Mapping[str, Mapping[str, str]] = {"AblationCAM": {"ablation_layer": "AblationLayer"}}


#: name → (check, what a valid value is): checked before anything runs.
CHECKS: Mapping[str, Check] = {
    "aug_smooth": BOOL,
    "eigen_smooth": BOOL,
    "smooth": BOOL,
    "use_softmax_scores": BOOL,
    "batch_size": POSITIVE_INT,
    "num_scales": POSITIVE_INT,
    "window_size": (lambda v: v is None or positive_int(v), "a positive integer or null"),
    "step_size": (lambda v: v is None or positive_int(v), "a positive integer or null"),
    "scales": (lambda v: v is None or (isinstance(v, list) and all(map(positive_int, v))),
               "a list of positive integers or null"),
    "ratio_channels_to_ablate": (lambda v: number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "pre_filter_ratio": (lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "pool": (lambda v: v in ("mean", "max"), "'mean' or 'max'"),
    "kernel": (lambda v: v in ("linear", "poly", "rbf", "sigmoid", "cosine"),
               "one of 'linear', 'poly', 'rbf', 'sigmoid', 'cosine' (sklearn KernelPCA)"),
    "gamma": (lambda v: v is None or number(v), "a number or null"),
    "k": (number, "a number"),
    "alpha": (number, "a number"),
    "theta": (number, "a number"),
    "scale_step_ratio": (lambda v: number(v) and v > 0, "a positive number"),
    "reshape_transform": (lambda v: v is None or v in RESHAPES, "null, \"vit\" (tokens with a class token first, "
                          "as torchvision's and timm's ViTs) or \"tokens\" (patch tokens only, as Swin's)"),
    "comparison_categories": (lambda v: v is None or (isinstance(v, list) and all(map(positive_int, v))),
                              "null or a list of similarity ranks (1 = the class of closest score)"),
}


#: ``params.reshape_transform``: the token layouts esegeta turns back into (B, C, *grid) maps.
RESHAPES = ("vit", "tokens")


def token_reshape(name: str, dims: int):
    """grad-cam's ``reshape_transform`` for a token layer: (B, [1 +] N, C) tokens → (B, C, *grid),
    the grid a square (cube for 3D) of N patches; ``"vit"`` drops the class token first."""

    def reshape(tokens):
        if tokens.ndim != 3:
            return tokens
        patches = tokens[:, 1:] if name == "vit" else tokens
        side = round(patches.shape[1] ** (1 / dims))
        if side ** dims != patches.shape[1]:
            raise ConfigError("params.reshape_transform", f"{patches.shape[1]} patch tokens do not form a square "
                                                          f"{dims}D grid" + (" (is there a class token? use \"vit\")"
                                                                             if name == "tokens" else ""))
        return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *([side] * dims))

    return reshape


def token_layer(model, context) -> list[str]:
    """The pre-flight check of the CAMs with a layer: a token layer (output (batch, tokens,
    features)) whose tokens are not on a square grid needs ``params.reshape_transform`` (which
    ShapleyCAM does not apply to the tensors it differentiates twice); on a grid the adapter
    reshapes them itself."""
    from esegeta.attribution.architectures import token_layout

    if context is None or context.layer is None:
        return []
    second_order = context.spec is not None and context.spec.name in SECOND_ORDER
    if context.params.get("reshape_transform") and not second_order:
        return []
    shape = context.layer_shape()
    if shape is None or len(shape) == context.x.ndim or token_layout(shape, context.x.ndim - 2):
        return []  # maps, or tokens on a grid: reshaped (the adapter's _on_grid)
    if second_order or (context.spec is not None
                        and "reshape_transform" not in context.spec.parameters()):
        return [f"layer {context.layer!r} outputs {tuple(shape)}, tokens rather than (batch, channels, *spatial) maps, "
                f"and {context.spec.id} does not apply a reshape_transform: use gradcam.GradCAM with params.reshape_transform "
                "\"vit\" or \"tokens\", or choose a convolutional layer"]
    return [f"layer {context.layer!r} outputs {tuple(shape)}, tokens rather than (batch, channels, *spatial) maps: "
            "set params.reshape_transform to \"vit\" (a class token first, then a square grid of patches) or "
            "\"tokens\" (patches only), or choose a convolutional layer"]


def fullgrad_order(model, context) -> list[str]:
    """FullGrad's pre-flight check. Upstream pairs the biases of every Conv2d/BatchNorm2d, in module
    order, with the gradients its hooks collect, in reverse order of the backward pass: that holds
    only if each layer runs once and the backward pass meets them in reverse module order (a
    chain). Skip connections (U-Nets) reorder the backward pass and the biases meet the wrong
    gradients (a broadcast error, or a bare AssertionError when a layer runs twice or never)."""
    import torch
    from torch import nn

    layers = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.BatchNorm2d) and m.bias is not None]
    if not layers or context is None:
        return []
    met: list[str] = []

    def hook(name):
        def forward_hook(module, args, output):
            if torch.is_tensor(output) and output.requires_grad:
                output.register_hook(lambda grad: met.insert(0, name))
        return forward_hook

    with removing() as handles:
        handles.extend(m.register_forward_hook(hook(name)) for name, m in layers)
        try:
            with torch.enable_grad():
                x = context.x[:1].detach().clone().requires_grad_(True)
                out = model(x)
                out = out if torch.is_tensor(out) else next(t for t in out if torch.is_tensor(t))
                out.float().sum().backward()
        except Exception:  # noqa: BLE001 (the check only compares orders; the run reports its own failure)
            return []
        finally:
            model.zero_grad(set_to_none=True)
    expected = [n for n, _ in layers]
    if met == expected:
        return []
    wrong = next((e for e, m in zip(expected, met) if e != m), expected[len(met)] if len(met) < len(expected) else met[-1])
    return [f"FullGrad pairs each bias with the gradient its hooks meet in reverse module order, and this model "
            f"breaks that order at {wrong} (a skip connection, or a layer run more or less than once): use "
            "gradcam.GradCAM or captum.IntegratedGradients"]


def _configurable(fn) -> dict[str, inspect.Parameter]:
    """The JSON-settable parameters of ``fn``; a class default (``base_method``) shows as its name."""
    return {
        name: p.replace(default=p.default.__name__) if name in CLASS_PARAMS and isinstance(p.default, type) else p
        for name, p in keyword_parameters(fn, NOT_CONFIGURABLE).items()
    }


def _call_signature(cls):
    """``__call__``, or ``forward`` where ``__call__`` only forwards ``*args, **kwargs`` to it."""
    params = inspect.signature(cls.__call__).parameters.values()
    return cls.forward if any(p.kind is p.VAR_POSITIONAL for p in params) else cls.__call__


#: Methods that differentiate twice (ShapleyCAM's Hessian-vector products).
SECOND_ORDER = frozenset({"ShapleyCAM"})


def _math_attention(enabled: bool):
    """Scaled dot-product attention on its math kernel: the fused CPU/CUDA kernels have no second
    derivative (``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented``); the math kernel computes the same values with plain, twice-differentiable ops."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _release(cam) -> None:
    """Release the hooks of a CAM and of the CAMs a meta-method (FinerCAM, SESS, RefineCAM) holds."""
    for inner in (cam, getattr(cam, "base_cam", None), *getattr(cam, "base_cam_per_layer", ())):
        holder = getattr(inner, "activations_and_grads", None)
        if holder is not None:
            # upstream's clear() detaches each kept tensor in place, which raises for a view (ShapleyCAM keeps
            # its gradients' graph: they can be views) and would lose the computed map: dropping the
            # references frees the graph as well
            for kept in (getattr(holder, "activations", None), getattr(holder, "gradients", None)):
                if isinstance(kept, list):
                    kept.clear()
            holder.release()


class GradCamAdapter:
    """The one adapter behind every pytorch-grad-cam class."""
    @staticmethod
    def _module():
        from esegeta.compat import import_torchvision

        import_torchvision()
        import pytorch_grad_cam

        return pytorch_grad_cam

    def _cls(self, name: str):
        return getattr(self._module(), name)

    @cache
    def parameters(self, spec: MethodSpec) -> Mapping[str, inspect.Parameter]:
        cls = self._cls(spec.name)
        attributes = {name: inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
                      for name, default in ATTRIBUTES.get(spec.name, {}).items()}
        return {**_configurable(cls.__init__), **_configurable(_call_signature(cls)), **attributes}

    def check_value(self, name: str, value: Any, path: str) -> None:
        """Check a JSON value before anything runs."""
        if name in CLASS_PARAMS:
            if value not in CAM_CLASSES:
                raise ConfigError(path, f"{value!r} is not a pytorch-grad-cam CAM class" + did_you_mean(value, CAM_CLASSES))
            return
        check_table(CHECKS, name, value, path)

    @staticmethod
    @cache
    def _init_names(cls) -> frozenset[str]:
        return frozenset(inspect.signature(cls.__init__).parameters)

    def run(self, spec: MethodSpec, call: Call):
        import torch

        if call.inputs.ndim - 2 not in spec.dims:
            raise ConfigError("inputs.spatial_dims", f"{spec.id} works on {' and '.join(map(str, spec.dims))}D inputs "
                                                     f"only: {DIMS_WHY.get(spec.name, 'upstream is 2D only')}")
        if call.params.get("aug_smooth") and call.forward is not call.network:
            raise ConfigError("params.aug_smooth", "aug_smooth flips the input, but the wrapper's masks are frozen "
                                                   "on the unflipped input: remove aug_smooth with a wrapper")
        target = call.targets
        if spec.name in TARGET_INDEX and target is not None and target.uniform() is None:
            # One class index per call: inputs with different targets go one at a time.
            return torch.cat([self._on_grid(spec, call, lambda c, i=i: self._run(spec, c, c.inputs[i:i + 1], target[i]))
                              for i in range(call.inputs.shape[0])])
        return self._on_grid(spec, call, lambda c: self._run(spec, c, c.inputs, target))

    def _on_grid(self, spec: MethodSpec, call: Call, run):
        """``run(call)``, where the layer outputs tokens on a grid without a ``reshape_transform``:
        with one, the grid's (logged), or, for the CAMs that take none or do not apply it to what
        they differentiate twice (ShapleyCAM), through a :class:`esegeta.attribution.architectures.TokenGrid`
        in the layer's place (a ``reshape_transform`` then finds maps and leaves them)."""
        from esegeta.attribution.architectures import token_grid, token_layout

        if not spec.needs_layer or (call.params.get("reshape_transform") is not None and spec.name not in SECOND_ORDER):
            return run(call)
        layers = call.layer if isinstance(call.layer, list) else [call.layer]  # RefineCAM fuses several
        if "reshape_transform" in self.parameters(spec) and spec.name not in SECOND_ORDER:
            layouts = {token_layout(tuple(dataclasses.replace(call, layer=layer).layer_output().shape),
                                    call.inputs.ndim - 2) for layer in layers}
            layout = layouts.pop() if len(layouts) == 1 else None
            if layout is None:
                return run(call)
            log.info("%s: the layer outputs tokens: reshape_transform %r applied", spec.id, layout)
            return run(dataclasses.replace(call, params={**call.params, "reshape_transform": layout}))
        if len(layers) > 1:  # a TokenGrid stands in for one layer
            return run(call)
        with token_grid(call) as on_grid:
            return run(on_grid)

    def _run(self, spec: MethodSpec, call: Call, x, target):
        """One upstream call on ``x``; ``target``: a Target, or one class index, or None."""
        import torch

        module = self._module()
        cls = getattr(module, spec.name)
        init_names = self._init_names(cls)
        params = {k: getattr(module, v) if k in CLASS_PARAMS else v for k, v in call.params.items()}
        if params.get("reshape_transform") is not None:
            params["reshape_transform"] = token_reshape(params["reshape_transform"], x.ndim - 2)
        attributes = ATTRIBUTES.get(spec.name, {})
        fresh = dict(FRESH.get(spec.name, {}))
        if params.get("reshape_transform") is not None and "ablation_layer" in fresh:
            fresh["ablation_layer"] = "AblationLayerVit"  # ablates the feature axis of (B, tokens, C)
        init_kw = {**{k: getattr(module, v)() for k, v in fresh.items()},
                   **{k: v for k, v in params.items() if k in init_names}}
        attr_kw = {k: v for k, v in params.items() if k not in init_names and k not in attributes}
        attr_kw["targets"] = None
        if spec.name in TARGET_INDEX and target is not None:
            attr_kw["target_idx"] = target if isinstance(target, int) else target[0]
        elif target is not None:
            attr_kw["targets"] = [module.utils.model_targets.ClassifierOutputTarget(i) for i in target.ints()]
        layers = (call.layer if isinstance(call.layer, list) else [call.layer]) if spec.needs_layer else []
        cam = None
        try:
            cam = cls(model=call.forward, target_layers=layers, **init_kw)
            for name, default in attributes.items():
                setattr(cam, name, params.get(name, default))
            with _math_attention(spec.name in SECOND_ORDER):
                result = cam(input_tensor=x.detach(), **attr_kw)
        finally:
            if cam is not None:
                _release(cam)
        # grad-cam hands back numpy maps: back to torch on the input's device
        return torch.as_tensor(result, dtype=torch.float32, device=x.device).unsqueeze(1)


ADAPTER = GradCamAdapter()

#: Why a class is registered for 2D only (what breaks upstream on a volume).
DIMS_WHY = {
    "ScoreCAM": "it upsamples the layer's activations with torch.nn.UpsamplingBilinear2d",
    "AblationCAM": "it repeats the input as a 4D batch (tensor.repeat(batch_size, 1, 1, 1))",
    "FullGrad": "it collects the biases of Conv2d/BatchNorm2d layers only and resizes maps as 2D images",
    "SESS": "it resizes and slides square 2D windows over the image",
}

_REF_GRADCAM = "Selvaraju et al. 2017, arXiv:1610.02391"
_ONE_SCALE = {"num_scales": 2}
#: ``aug_smooth`` runs every map under 6 test-time augmentations (flip × 3 scales).
AUGMENTATIONS = 6


def _per_channel(fraction_key: str | None = None) -> cost.Formula:
    """ScoreCAM and AblationCAM: one forward row per channel of the layer (``fraction_key``: the
    fraction of channels ablated), plus the unperturbed input."""
    def formula(values, x, layer_shape) -> Passes:
        if layer_shape is None or len(layer_shape) < 2:
            return Passes(None, None, False, "one pass per channel of the layer: its size is known at run time")
        channels = int(layer_shape[1])
        if fraction_key is not None and cost.count(values.get(fraction_key)):
            channels = max(1, math.ceil(channels * float(values[fraction_key])))
        return Passes(channels + 1, 0)
    return formula


def _sess_passes(values, x, layer_shape) -> Passes:
    scales = values.get("num_scales")
    if not cost.count(scales):
        return Passes(None, None, False, "num_scales not known")
    return Passes(None, None, False, f"{int(scales)} scales × sliding windows: counted at run time")


def _augmented(formula: cost.Formula) -> cost.Formula:
    """``formula`` times :data:`AUGMENTATIONS` when ``aug_smooth`` is on (every grad-cam method takes it)."""
    def passes(values, x, layer_shape) -> Passes:
        found = formula(values, x, layer_shape)
        return found.times(AUGMENTATIONS) if values.get("aug_smooth") is True else found
    return passes


_GRADIENT, _FORWARD = cost.gradient, cost.forward_only

#: name → (dims, needs_layer, needs_target, tasks, quick_params, reference, passes, batch layout).
#: ScoreCAM's and AblationCAM's cost is one forward per channel of the layer (batch_size only
#: groups them): quick params cannot shorten them. FinerCAM contrasts the target with the
#: classes of most similar score; the columns of a wrapped segmenter are sums over regions
#: of different sizes, whose closeness means nothing (and its map comes out all zero on the
#: samples): classifiers only. SESS explains resized crops, where frozen masks do not apply.
#: RefineCAM multiplies the CAMs of the layers of its entry's ``layer`` list (one name: its
#: base_method's CAM). EigenCAM, KPCA_CAM and FEM do not depend on the target. The gradient CAMs
#: explain a batch of wrapped inputs as rows; the others run one input per call (randomness,
#: a decomposition over the batch, per-channel batches, or not verified batched). No CAM keeps an axiom.
TABLE: Mapping[str, tuple] = {
    "GradCAM": ((2, 3), True, True, None, {}, _REF_GRADCAM, _GRADIENT, ROWS),
    "HiResCAM": ((2, 3), True, True, None, {}, "Draelos & Carin 2020, arXiv:2011.08891", _GRADIENT, ROWS),
    "GradCAMElementWise": ((2, 3), True, True, None, {}, "pytorch-grad-cam: ReLU(gradients × activations) summed",
                           _GRADIENT, ROWS),
    "GradCAMPlusPlus": ((2, 3), True, True, None, {}, "Chattopadhyay et al. 2018, arXiv:1710.11063", _GRADIENT, ROWS),
    "XGradCAM": ((2, 3), True, True, None, {}, "Fu et al. 2020, arXiv:2008.02312", _GRADIENT, ROWS),
    "AblationCAM": ((2,), True, True, None, {}, "Desai & Ramaswamy 2020, WACV", _per_channel("ratio_channels_to_ablate"),
                    PER_INPUT),
    "ScoreCAM": ((2,), True, True, None, {}, "Wang et al. 2020, arXiv:1910.01279", _per_channel(), PER_INPUT),
    "EigenCAM": ((2, 3), True, False, None, {}, "Muhammad & Yeasin 2020, arXiv:2008.00299", _FORWARD, PER_INPUT),
    "EigenGradCAM": ((2, 3), True, True, None, {}, "pytorch-grad-cam: EigenCAM of gradients × activations", _FORWARD,
                     PER_INPUT),
    "LayerCAM": ((2, 3), True, True, None, {}, "Jiang et al. 2021, doi:10.1109/TIP.2021.3089943", _GRADIENT, ROWS),
    "FullGrad": ((2,), False, True, None, {}, "Srinivas & Fleuret 2019, arXiv:1905.00780", _GRADIENT, PER_INPUT),
    "KPCA_CAM": ((2, 3), True, False, None, {}, "Karmani et al. 2024, arXiv:2410.00267", _FORWARD, PER_INPUT),
    "RandomCAM": ((2, 3), True, True, None, {}, "pytorch-grad-cam: random channel weights (a sanity baseline)",
                  _GRADIENT, PER_INPUT),
    "ShapleyCAM": ((2, 3), True, True, None, {}, "Cai 2025, arXiv:2501.06261", _GRADIENT, PER_INPUT),
    "FinerCAM": ((2, 3), True, True, ("classification",), {}, "Zhang et al. 2025, arXiv:2501.11309", _GRADIENT,
                 PER_INPUT),
    "FEM": ((2, 3), True, False, None, {}, "Fuad et al. 2020, IPTA, hal-02963298", _FORWARD, PER_INPUT),
    "SegEigenCAM": ((2, 3), True, True, None, {}, "Chung & Ying 2025, doi:10.3390/app15137562", _FORWARD, PER_INPUT),
    "RefineCAM": ((2, 3), True, True, None, {}, "pytorch-grad-cam RefineCAM, arXiv:2605.14641", _GRADIENT, PER_INPUT),
    "SESS": ((2,), True, True, ("classification",), _ONE_SCALE, "Tursun et al. 2022, arXiv:2207.01769", _sess_passes,
             PER_INPUT),
}
#: RefineCAM fuses the layers of a list (one name is a list of one: its base_method's CAM).
FUSES_LAYERS = {"RefineCAM": 1}
#: The classes a meta-method's ``base_method`` may name.
CAM_CLASSES = tuple(name for name in TABLE if name not in ("FinerCAM", "RefineCAM", "SESS"))

for _name, (_dims, _layer, _target, _tasks, _quick, _ref, _passes, _layout) in TABLE.items():
    register(MethodSpec(
        library=LIBRARY, name=_name, kind="attribution", adapter=ADAPTER, needs_layer=_layer, dims=_dims,
        needs_target=_target, **({"tasks": _tasks} if _tasks else {}), quick_params=_quick, reference=_ref,
        uses_global_rng=True if _name in GLOBAL_RNG else None,
        preflight=token_layer if _layer else fullgrad_order if _name == "FullGrad" else None,
        passes=_augmented(_passes), batch_layout=_layout, axiom="none", fuses_layers=FUSES_LAYERS.get(_name, 0),
    ))
