"""Captum (https://captum.ai): every attribution method that applies to image models.

One generic adapter serves the whole table: the constructor gets the forward function
(and the layer for layer/neuron methods), ``attribute`` gets the inputs, the target and
the config's params under Captum's own names. JSON lists become the tuples Captum wants,
baseline/feature-mask shorthands become tensors (see :mod:`esegeta.attribution.baselines`), and
``noise_tunnel`` wraps the method in :class:`captum.attr.NoiseTunnel`.
"""
from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping
from functools import cache
from typing import Any

from esegeta.errors import ConfigError
from esegeta.spec import cost
from esegeta.spec.cost import Passes
from esegeta.spec.params import check_number, positive_int
from esegeta.spec.registry import PER_INPUT, ROWS, TILE, Call, Library, MethodSpec, keyword_parameters, register

log = logging.getLogger("esegeta")

#: Captum draws from torch's RNG only (GradientShap's methods also from numpy's: their specs say so).
LIBRARY = Library(
    "captum", "captum", "captum", ("captum",), uses_global_rng=False, reads_samples=False,
    batch_params={"internal_batch_size": "n_steps", "perturbations_per_eval": None,
                  "nt_samples_batch_size": "nt_samples"},
    step_params=("n_steps", "nt_samples", "n_samples"), reference="Kokhlikyan et al. 2020, arXiv:2009.07896")

#: Upstream arguments a JSON config cannot or must not set (esegeta supplies them).
NOT_CONFIGURABLE = frozenset({
    "self", "forward_func", "model", "layer", "device_ids", "inputs", "target",
    "additional_forward_args", "return_convergence_delta", "custom_attribution_func",
    "interpretable_model", "similarity_func", "perturb_func", "attribution_method",
})
#: esegeta's own parameter of Captum's LRP methods: γ of the generalised γ rule on the dense layers (0: Captum's ε rule there).
GAMMA = "gamma"
LRP_METHODS = frozenset({"LRP", "LayerLRP"})
#: Parameters whose JSON lists must become tuples.
TUPLE_PARAMS = frozenset({"sliding_window_shapes", "strides", "neuron_selector", "stdevs"})
BASELINE_PARAMS = frozenset({"baselines", "layer_baselines"})
MASK_PARAMS = frozenset({"feature_mask", "layer_mask"})


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _configurable(fn) -> dict[str, inspect.Parameter]:
    return keyword_parameters(fn, NOT_CONFIGURABLE)


#: Modules that move values without changing them: reshapes and permutations, and those that are
#: the identity in eval mode (dropouts, stochastic depth). They take the ε rule, exact for them; not
#: Captum's identity rule, which fails on a module that returns its input tensor itself (its input
#: hook then runs before its output hook, and finds no relevance: ``KeyError: device``).
_PASSING = ("Flatten", "Unflatten", "Identity", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout")
_PASSING_NAMES = frozenset({"Permute", "Rearrange", "StochasticDepth", "DropPath",
                            "PlainSoftmax"})  # attention's softmax, held constant (esegeta.attribution.rules)
#: A wrapper's masked sum (:class:`esegeta.attribution.wrappers.MaskSum`), linear in the activated
#: output: the ε rule hands each pixel its share ``A·M / score`` of the score. (Without a rule the
#: relevance entering the model was the gradient ``M``: the demo's map summed to ~7,000× its score.)
_WRAPPER_HEADS = frozenset({"MaskSum"})
#: The leaf of a convolution under the z⁺ or γ rule (:class:`esegeta.attribution.rules.SignSplit`,
#: ``params.conv_rule``): it computes the rule's denominator, and the ε rule on it gives the rule.
_RULE_PARTS = frozenset({"SignSplitPart"})
#: Layers the ε rule treats as linear. Normalisation layers (instance, group, layer norm, and
#: torchvision's LayerNorm2d, a LayerNorm subclass) are linear maps of their centred input once
#: their standard deviation is held constant (AttnLRP, Achtibat et al. 2024, arXiv:2402.05602); while
#: LRP runs, the LRP-conservative substitutes (:mod:`esegeta.attribution.rules`) give them a backward
#: pass under which the ε rule leaves each element its relevance.
_EPSILON_LAYERS = ("Conv1d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear",
                   "BatchNorm1d", "BatchNorm3d", "AvgPool1d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool3d",
                   "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "GroupNorm", "LayerNorm", "LocalResponseNorm",
                   "Upsample", *_PASSING)
#: Layers relevance passes through unchanged (the identity rule): elementwise activations, as
#: Captum does for ReLU: the relevance of an output is that of its input (Hardswish, SiLU, GELU,
#: PReLU... are gated identities, x·g(x), whose gate LRP does not credit, as for the gates of
#: LSTMs, Arras et al. 2017, arXiv:1706.07206).
_IDENTITY_LAYERS = ("Sigmoid", "Softmax", "LogSoftmax", "LeakyReLU", "ELU", "GELU", "SiLU", "Hardswish", "Hardsigmoid",
                    "Hardtanh", "ReLU6", "PReLU", "Mish", "Softplus", "Tanh")


def lrp_rule_for(module) -> str | None:
    """The name of the LRP rule Captum's LRP applies to leaf ``module`` in esegeta (Captum's own
    rule for the layers it supports; ε for the other linear and normalisation layers, reshapes
    and eval-mode dropouts, identity for elementwise activations: see the comments above), or
    None if there is none and LRP will refuse the model."""
    from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES, SUPPORTED_NON_LINEAR_LAYERS
    from torch import nn

    if hasattr(module, "rule"):
        return type(module.rule).__name__
    if type(module) in SUPPORTED_LAYERS_WITH_RULES:
        return SUPPORTED_LAYERS_WITH_RULES[type(module)].__name__
    if type(module) in SUPPORTED_NON_LINEAR_LAYERS:
        return "non-linear (relevance passes)"
    if (isinstance(module, tuple(getattr(nn, n) for n in _EPSILON_LAYERS if hasattr(nn, n)))
            or type(module).__name__ in _PASSING_NAMES | _WRAPPER_HEADS | _RULE_PARTS):
        return "EpsilonRule"
    if isinstance(module, tuple(getattr(nn, n) for n in _IDENTITY_LAYERS if hasattr(nn, n))):
        return "IdentityRule"
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # an empty container: never called, its rule never runs
        return "EpsilonRule"
    return None


def lrp_gaps(model, context=None) -> list[str]:
    """The LRP methods' pre-flight check: the leaf layers of ``model`` that neither Captum nor
    esegeta has a rule for (Captum's LRP refuses the model then), and attention the LRP-conservative
    substitutes do not cover (:mod:`esegeta.attribution.rules`: ``nn.MultiheadAttention`` with
    ``bias_k``/``add_zero_attn``), as problems, or none."""
    from esegeta.attribution.rules import unsupported_attention

    unsupported = unsupported_attention(model)
    if unsupported:
        return [f"no LRP rule for attention ({unsupported[0]}{' and more' if len(unsupported) > 1 else ''}): "
                "esegeta holds the softmax weights of plain attention constant (AttnLRP), not with extra key/value "
                "biases or a zero-attention row; use captum.IntegratedGradients, or gradcam.GradCAM with "
                "params.reshape_transform \"vit\""]
    from esegeta.attribution.prepare import Alias

    aliases = [(name, m.alias_of) for name, m in model.named_modules() if isinstance(m, Alias)]
    if aliases:
        return [f"the model registers modules under two names ({aliases[0][0]} is {aliases[0][1]}), and Captum's LRP "
                "walks the module tree, not the calls: use zennit's composites (e.g. zennit.EpsilonPlus), which "
                "hook each module once"]
    gaps = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
            if name and not list(m.children()) and lrp_rule_for(m) is None]
    if not gaps:
        return []
    return [f"no LRP rule for {', '.join(gaps[:8])}{' ...' if len(gaps) > 8 else ''}: Captum's LRP will refuse "
            "the model; try zennit's composites"]


def token_layer(model, context) -> list[str]:
    """Grad-CAM's pre-flight check: the layer's output must be (batch, channels, *spatial) like
    the input, or tokens on a square grid (explained on it). Other tokens (batch, tokens,
    features): Captum would take the tokens for channels and return a map of one pixel per feature."""
    from esegeta.attribution.architectures import token_layout

    shape = context.layer_shape() if context is not None else None
    if shape is None or len(shape) == context.x.ndim or token_layout(shape, context.x.ndim - 2):
        return []  # maps, or tokens on a grid: explained on the grid (esegeta.attribution.architectures.token_grid)
    return [f"layer {context.layer!r} outputs {tuple(shape)}, tokens rather than (batch, channels, *spatial) maps, "
            "and not on a square grid: Grad-CAM would take the tokens for channels; use gradcam.GradCAM with "
            "params.reshape_transform "
            "\"vit\" (a class token first, then a square grid of patches) or \"tokens\" (patches only), or a "
            "convolutional layer"]


def grid_on_tokens(model, context) -> list[str]:
    """LayerFeatureAblation's check: a ``layer_mask`` grid is laid over the layer's spatial axes,
    which a token layer (batch, tokens, features) does not have."""
    mask = context.params.get("layer_mask") if context is not None else None
    if not (isinstance(mask, dict) and "grid" in mask):
        return []
    from esegeta.attribution.architectures import token_layout

    shape = context.layer_shape()
    if shape is None or len(shape) == context.x.ndim or token_layout(shape, context.x.ndim - 2):
        return []  # maps, or tokens on a grid: the grid is laid over it (esegeta.attribution.architectures.token_grid)
    return [f"layer {context.layer!r} outputs {tuple(shape)}, tokens without spatial axes for params.layer_mask's "
            "grid: leave layer_mask out (each feature ablated alone), pass a tensor of token groups from Python, "
            "or choose a convolutional layer"]


def _attach_lrp_rules(model) -> list[str]:
    """Give the prepared copy's leaf modules that Captum's LRP has no rule for a rule
    (see :func:`lrp_rule_for`), before every LRP call (the guard removes them afterwards). The γ
    rule of ``params.gamma`` on dense layers and ``params.conv_rule``'s on convolutions are
    :func:`esegeta.attribution.rules.sign_split`'s."""
    from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES, SUPPORTED_NON_LINEAR_LAYERS
    from captum.attr._utils.lrp_rules import EpsilonRule, IdentityRule

    rules = {"EpsilonRule": EpsilonRule, "IdentityRule": IdentityRule}
    changed = []
    for name, module in model.named_modules():
        if list(module.children()) or hasattr(module, "rule"):
            continue
        if type(module) in SUPPORTED_LAYERS_WITH_RULES or type(module) in SUPPORTED_NON_LINEAR_LAYERS:
            continue
        rule = rules.get(lrp_rule_for(module) or "")
        if rule is None:
            continue
        module.rule = rule()
        changed.append(f"{name or type(module).__name__}: {rule.__name__}")
    return changed


class CaptumAdapter:
    """The one adapter behind every Captum method."""
    @staticmethod
    def _cls(name: str):
        import captum.attr

        return getattr(captum.attr, name)

    @cache
    def parameters(self, spec: MethodSpec) -> Mapping[str, inspect.Parameter]:
        cls = self._cls(spec.name)
        from esegeta.attribution.rules import BRANCHES, CONV_RULE

        own = {GAMMA: inspect.Parameter(GAMMA, inspect.Parameter.KEYWORD_ONLY, default=0.0),
               BRANCHES: inspect.Parameter(BRANCHES, inspect.Parameter.KEYWORD_ONLY, default="auto"),
               CONV_RULE: inspect.Parameter(CONV_RULE, inspect.Parameter.KEYWORD_ONLY, default="auto")} \
            if spec.name in LRP_METHODS else {}
        return {**_configurable(cls.__init__), **_configurable(cls.attribute), **own}

    @staticmethod
    @cache
    def noise_tunnel_parameters() -> Mapping[str, inspect.Parameter]:
        """What a ``noise_tunnel`` block may set: :class:`captum.attr.NoiseTunnel`'s keywords."""
        return _configurable(CaptumAdapter._cls("NoiseTunnel").attribute)

    def check_value(self, name: str, value: Any, path: str) -> None:
        """Check a JSON value before anything runs (what can be checked without the input)."""
        from esegeta.attribution.baselines import check_baseline, check_feature_mask

        from esegeta.attribution.rules import BRANCHES, CONV_RULE, check_branches, check_conv_rule

        if name == BRANCHES:
            check_branches(value, path)
        elif name == CONV_RULE:
            check_conv_rule(value, path)
        elif name == GAMMA:
            check_number(name, value, path)
            if value < 0:
                raise ConfigError(path, f"gamma must be 0 (the ε rule on dense layers) or positive (the γ rule, "
                                        f"e.g. 0.25), not {value!r}")
        elif name in BASELINE_PARAMS:
            check_baseline(value, path)
        elif name in MASK_PARAMS:
            check_feature_mask(value, path)

    def convert(self, name: str, value: Any, call: Call, path: str) -> Any:
        """A JSON parameter value as Captum wants it."""
        import torch

        from esegeta.attribution.baselines import make_baselines, make_feature_mask

        if name in BASELINE_PARAMS:
            return make_baselines(value, call.inputs, path)
        if name == "layer_mask" and isinstance(value, dict) and "grid" in value:
            shape = call.layer_output().shape
            layer_like = torch.empty(shape[0], 1, *shape[2:], device=call.inputs.device)
            return make_feature_mask(value, layer_like, path)
        if name in MASK_PARAMS:
            return make_feature_mask(value, call.inputs, path)
        if name in TUPLE_PARAMS:
            return _tuples(value)
        return value

    @staticmethod
    @cache
    def _init_names(name: str) -> frozenset[str]:
        return frozenset(inspect.signature(CaptumAdapter._cls(name).__init__).parameters)

    def run(self, spec: MethodSpec, call: Call):
        from esegeta.attribution.architectures import token_grid

        mask = call.params.get("layer_mask")
        if spec.name in ("LayerGradCam", "GuidedGradCam") or (isinstance(mask, dict) and "grid" in mask):
            with token_grid(call) as on_grid:  # a token layer: its tokens as maps on their grid
                return self._attribute(spec, on_grid)
        return self._attribute(spec, call)

    def _attribute(self, spec: MethodSpec, call: Call):
        cls = self._cls(spec.name)
        init_names = self._init_names(spec.name)
        from esegeta.attribution.rules import BRANCHES, CONV_RULE, sign_split

        values = {k: self.convert(k, v, call, f"params.{k}") for k, v in call.params.items()
                  if k not in (GAMMA, BRANCHES, CONV_RULE)}
        init_kw = {k: v for k, v in values.items() if k in init_names}
        attr_kw = {k: v for k, v in values.items() if k not in init_names}
        if spec.needs_target:
            attr_kw["target"] = call.target

        args = (call.forward, call.layer) if spec.needs_layer else (call.forward,)
        method = cls(*args, **init_kw)
        if call.noise_tunnel is not None:
            method = self._cls("NoiseTunnel")(method)
            attr_kw.update(_tuples(dict(call.noise_tunnel)))
        if "DeepLift" in spec.name:  # the rescale rule for SiLU, GELU, Hardswish...
            from esegeta.attribution.architectures import extend_deeplift_rules

            extend_deeplift_rules()
        if not issubclass(cls, self._cls("LRP")):
            result = method.attribute(call.inputs, **attr_kw)
        else:  # LRP and LayerLRP: the convolutions' rule, and rules for the layers Captum lacks
            with sign_split(call.network, call.inputs, call.params.get(CONV_RULE, "auto"), keep=call.layer,
                            dense_gamma=float(call.params.get(GAMMA, 0.0))):
                changed = _attach_lrp_rules(call.forward)
                if changed:
                    log.debug("LRP rules set on the prepared copy: %s", "; ".join(changed))
                result = method.attribute(call.inputs, **attr_kw)
        if isinstance(result, (tuple, list)):
            if len(result) != 1:
                raise ValueError(f"{spec.id} returned {len(result)} tensors; esegeta explains one input tensor")
            result = result[0]
        return result


ADAPTER = CaptumAdapter()
_REF_GRAD = "Simonyan et al. 2014, arXiv:1312.6034"


def _window(x) -> list[int]:
    return [x.shape[1]] + [max(1, s // 8) for s in x.shape[2:]]


def _stride(x) -> list[int]:
    return [x.shape[1]] + [max(1, s // 16) for s in x.shape[2:]]


def _quarter(x) -> list[int]:
    return [x.shape[1]] + [max(1, s // 4) for s in x.shape[2:]]


def grid_fits(model, context) -> list[ConfigError]:
    """A ``feature_mask`` grid needs one block size per spatial axis of the input, none larger than
    its axis (a larger block is the whole axis: almost surely not what was meant)."""
    grid = context.params.get("feature_mask")
    if not (isinstance(grid, dict) and isinstance(grid.get("grid"), list)):
        return []
    block, spatial = grid["grid"], [int(s) for s in context.x.shape[2:]]
    if len(block) != len(spatial):
        return [ConfigError("params.feature_mask.grid", f"give {len(spatial)} block sizes, one per spatial axis of the "
                                                        f"input {spatial}, not {block!r}")]
    if any(b > s for b, s in zip(block, spatial)):
        return [ConfigError("params.feature_mask.grid", f"{block} is larger than the input's spatial size {spatial}: "
                                                        "give block sizes up to those")]
    return []


def occlusion_fits(model, context) -> list[ConfigError]:
    """Captum's Occlusion slides a window over (channels, *spatial) of one input: the window and
    the strides need one positive size per axis, the window no larger than the input, a stride
    no larger than the window where the window does not cover the whole axis (Captum asserts
    these mid-run; a stride of 0 divides by zero). Lists (JSON) and tuples (Captum's own form) alike."""
    x = context.x
    axes = tuple(int(s) for s in x.shape[1:])
    window = context.params.get("sliding_window_shapes", _window(x))
    strides = context.params.get("strides", _stride(x))
    told = "" if "strides" in context.params else " (the default for this input; set params.strides)"
    found = []
    if not (isinstance(window, (list, tuple)) and len(window) == len(axes) and all(positive_int(w) for w in window)):
        return [ConfigError("params.sliding_window_shapes", f"give {len(axes)} positive sizes, one per axis of "
                            f"(channels, *spatial) = {list(axes)}, not {window!r}")]
    if any(w > a for w, a in zip(window, axes)):
        found.append(ConfigError("params.sliding_window_shapes", f"{list(window)} is larger than the input's "
                                 f"(channels, *spatial) = {list(axes)}: give sizes up to those"))
    steps = strides if isinstance(strides, (list, tuple)) else [strides] * len(axes)
    if not (len(steps) == len(axes) and all(positive_int(s) for s in steps)):
        found.append(ConfigError("params.strides", f"give a positive integer, or {len(axes)} of them (one per axis "
                                 f"of (channels, *spatial)), not {strides!r}"))
    elif any(s > w and w < a for s, w, a in zip(steps, window, axes)):
        found.append(ConfigError("params.strides", f"{strides!r}{told} is larger than the window {window} on an axis "
                                 "it does not cover whole: a stride skips what no window covers; give strides up to "
                                 "the window's sizes"))
    return found


def _quick_grid(x) -> dict:
    return {"grid": [max(1, -(-s // 4)) for s in x.shape[2:]]}


def _quick_layer_grid(x) -> dict:
    return {"grid": [4] * (x.ndim - 2)}


_SHAP_BASELINES = {"baselines": ["zeros", "blur"]}
_IG_QUICK = {"n_steps": 8}
_PERTURB_QUICK = {"feature_mask": _quick_grid, "perturbations_per_eval": 16}


def _occlusion_passes(values, x, layer_shape) -> Passes:
    """One forward row per window position (a last, partial step included), plus the unperturbed input."""
    shape = list(x.shape[1:])
    window = cost.as_list(values.get("sliding_window_shapes"), len(shape))
    stride = cost.as_list(values.get("strides") if values.get("strides") is not None else 1, len(shape))
    if window is None or stride is None:
        return Passes(None, None, False, "sliding_window_shapes/strides not known")
    return Passes(cost.windows(shape, window, stride, ceil=True) + 1, 0)


def _ablation_passes(values, x, layer_shape) -> Passes:
    """One forward row per feature switched off, plus the unperturbed input."""
    return Passes(cost.n_features(values, x) + 1, 0)


def _layer_ablation_passes(values, x, layer_shape) -> Passes:
    """One forward row per layer feature (per element of the layer without a layer_mask), plus the unperturbed input."""
    if values.get("layer_mask") is None and layer_shape is None:
        return Passes(None, None, False, "one pass per layer element: the layer's size is known at run time")
    rows = math.prod(layer_shape[1:]) if values.get("layer_mask") is None else cost.n_features(values, x, "layer_mask")
    return Passes(rows + 1, 0)


def _shapley_passes(values, x, layer_shape) -> Passes:
    """One forward row per feature and permutation sample, plus the unperturbed input."""
    samples = values.get("n_samples")
    if not cost.count(samples):
        return Passes(None, None, False, "n_samples not known")
    return Passes(int(samples) * cost.n_features(values, x) + 1, 0)


# The facts of each method's row: ``passes`` (model rows per input, esegeta.spec.cost), ``layout`` (how a
# batch of wrapped inputs is explained in one call, esegeta.attribution.batching) and ``axiom``. Left
# per_input on purpose: methods with randomness (the GradientShap family, ShapleyValueSampling,
# KernelShap, Lime: a batch draws other numbers than one input does), LRP and DeepLift (their rules
# divide by small activations and amplify the batch's rounding: batched results differ from one input
# at a time by far more than rounding), LayerFeatureAblation (Captum does not repeat a per-input
# target for perturbations_per_eval > 1); the neuron methods are not declared (tests/test_batching.py
# checks every declared layout against one input at a time).
_GRADIENT, _DEEPLIFT = cost.gradient, cost.baseline_pairs()
_STEPS, _SAMPLES = cost.steps("n_steps"), cost.steps("n_samples")


def _captum(name, *, passes, layout, axiom, kind="attribution", layer=False, defaults=None, quick=None, target=True,
            ref="", leaf=False, global_rng=None, preflight=None):
    register(MethodSpec(
        library=LIBRARY, name=name, kind=kind, adapter=ADAPTER, needs_layer=layer, leaf_layer=leaf,
        needs_target=target, defaults=defaults or {}, quick_params=quick or {}, reference=ref,
        uses_global_rng=global_rng, preflight=preflight, noise_tunnel=CaptumAdapter.noise_tunnel_parameters,
        passes=passes, batch_layout=layout, axiom=axiom,
    ))


# Input attributions.
_captum("Saliency", passes=_GRADIENT, layout=ROWS, axiom="none", ref=_REF_GRAD)
_captum("InputXGradient", passes=_GRADIENT, layout=ROWS, axiom="none", ref="Shrikumar et al. 2016, arXiv:1605.01713")
_captum("IntegratedGradients", passes=_STEPS, layout=TILE, axiom="completeness", quick=_IG_QUICK,
        ref="Sundararajan et al. 2017, arXiv:1703.01365")
_captum("DeepLift", passes=_DEEPLIFT, layout=PER_INPUT, axiom="summation-to-delta",
        ref="Shrikumar et al. 2017, arXiv:1704.02685")
_captum("DeepLiftShap", passes=_DEEPLIFT, layout=PER_INPUT, axiom="summation-to-delta", defaults=_SHAP_BASELINES,
        ref="Lundberg & Lee 2017, arXiv:1705.07874")
# The GradientShap methods draw their baselines with numpy's global RNG.
_captum("GradientShap", passes=_SAMPLES, layout=PER_INPUT, axiom="completeness-in-expectation",
        defaults=_SHAP_BASELINES, ref="Lundberg & Lee 2017, arXiv:1705.07874", global_rng=True)
_captum("GuidedBackprop", passes=_GRADIENT, layout=ROWS, axiom="none", ref="Springenberg et al. 2015, arXiv:1412.6806")
_captum("Deconvolution", passes=_GRADIENT, layout=ROWS, axiom="none", ref="Zeiler & Fergus 2014, arXiv:1311.2901")
_captum("GuidedGradCam", passes=_GRADIENT, layout=ROWS, axiom="none", layer=True, preflight=token_layer,
        ref="Selvaraju et al. 2017, arXiv:1610.02391")
_captum("FeatureAblation", passes=_ablation_passes, layout=TILE, axiom="none", quick=_PERTURB_QUICK,
        preflight=grid_fits, ref="feature ablation")
_captum("Occlusion", passes=_occlusion_passes, layout=TILE, axiom="none",
        defaults={"sliding_window_shapes": _window, "strides": _stride}, preflight=occlusion_fits,
        quick={"sliding_window_shapes": _quarter, "strides": _quarter, "perturbations_per_eval": 16},
        ref="Zeiler & Fergus 2014, arXiv:1311.2901")
_captum("ShapleyValueSampling", passes=_shapley_passes, layout=PER_INPUT, axiom="efficiency",
        quick={**_PERTURB_QUICK, "n_samples": 2}, preflight=grid_fits,
        ref="Castro et al. 2009, doi:10.1016/j.cor.2008.04.004")
_captum("KernelShap", passes=cost.forward_steps("n_samples", 1), layout=PER_INPUT, axiom="none",
        quick={"feature_mask": _quick_grid, "n_samples": 32}, preflight=grid_fits,
        ref="Lundberg & Lee 2017, arXiv:1705.07874")
_captum("Lime", passes=cost.forward_steps("n_samples", 1), layout=PER_INPUT, axiom="none",
        quick={"feature_mask": _quick_grid, "n_samples": 32}, preflight=grid_fits, ref="Ribeiro et al. 2016, arXiv:1602.04938")
_captum("LRP", passes=_GRADIENT, layout=PER_INPUT, axiom="conservation", preflight=lrp_gaps,
        ref="Bach et al. 2015, doi:10.1371/journal.pone.0130140")

# Layer attributions (results at the layer's resolution).
_captum("LayerActivation", passes=cost.forward_only, layout=ROWS, axiom="none", kind="layer", layer=True,
        target=False)
_captum("LayerConductance", passes=_STEPS, layout=TILE, axiom="completeness", kind="layer", layer=True,
        quick=_IG_QUICK, ref="Dhamdhere et al. 2018, arXiv:1805.12233")
_captum("LayerGradCam", passes=_GRADIENT, layout=ROWS, axiom="none", kind="layer", layer=True, preflight=token_layer,
        ref="Selvaraju et al. 2017, arXiv:1610.02391")
_captum("LayerGradientShap", passes=_SAMPLES, layout=PER_INPUT, axiom="completeness-in-expectation", kind="layer",
        layer=True, defaults=_SHAP_BASELINES, global_rng=True)
_captum("LayerGradientXActivation", passes=_GRADIENT, layout=ROWS, axiom="none", kind="layer", layer=True)
_captum("LayerDeepLift", passes=_DEEPLIFT, layout=PER_INPUT, axiom="summation-to-delta", kind="layer", layer=True,
        ref="Shrikumar et al. 2017, arXiv:1704.02685")
_captum("LayerDeepLiftShap", passes=_DEEPLIFT, layout=PER_INPUT, axiom="summation-to-delta", kind="layer",
        layer=True, defaults=_SHAP_BASELINES)
_captum("LayerIntegratedGradients", passes=_STEPS, layout=TILE, axiom="completeness", kind="layer", layer=True,
        quick=_IG_QUICK)
_captum("LayerFeatureAblation", passes=_layer_ablation_passes, layout=PER_INPUT, axiom="none", kind="layer",
        layer=True, preflight=grid_on_tokens, quick={"layer_mask": _quick_layer_grid, "perturbations_per_eval": 16})
_captum("LayerLRP", passes=_GRADIENT, layout=PER_INPUT, axiom="conservation", kind="layer", layer=True, leaf=True,
        preflight=lrp_gaps, ref="Bach et al. 2015, doi:10.1371/journal.pone.0130140")
_captum("InternalInfluence", passes=_STEPS, layout=TILE, axiom="none", kind="layer", layer=True, quick=_IG_QUICK,
        ref="Leino et al. 2018, arXiv:1802.03788")

# Neuron attributions: params.neuron_selector names the neuron (index into the layer output, no batch axis).
_captum("NeuronGuidedBackprop", passes=_GRADIENT, layout=PER_INPUT, axiom="none", kind="neuron", layer=True,
        target=False)
_captum("NeuronGradient", passes=_GRADIENT, layout=PER_INPUT, axiom="none", kind="neuron", layer=True, target=False)
_captum("NeuronIntegratedGradients", passes=_STEPS, layout=PER_INPUT, axiom="completeness", kind="neuron",
        layer=True, target=False, quick=_IG_QUICK)
_captum("NeuronConductance", passes=_STEPS, layout=PER_INPUT, axiom="none", kind="neuron", layer=True,
        quick=_IG_QUICK, ref="Dhamdhere et al. 2018, arXiv:1805.12233")
_captum("NeuronDeconvolution", passes=_GRADIENT, layout=PER_INPUT, axiom="none", kind="neuron", layer=True,
        target=False, ref="Zeiler & Fergus 2014, arXiv:1311.2901")
_captum("NeuronDeepLift", passes=_DEEPLIFT, layout=PER_INPUT, axiom="summation-to-delta", kind="neuron", layer=True,
        target=False, ref="Shrikumar et al. 2017, arXiv:1704.02685")
_captum("NeuronDeepLiftShap", passes=_DEEPLIFT, layout=PER_INPUT, axiom="summation-to-delta", kind="neuron",
        layer=True, target=False, defaults=_SHAP_BASELINES)
_captum("NeuronGradientShap", passes=_SAMPLES, layout=PER_INPUT, axiom="completeness-in-expectation", kind="neuron",
        layer=True, target=False, defaults=_SHAP_BASELINES, global_rng=True)
_captum("NeuronFeatureAblation", passes=_ablation_passes, layout=PER_INPUT, axiom="none", kind="neuron", layer=True,
        target=False, quick=_PERTURB_QUICK)
