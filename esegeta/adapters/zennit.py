"""Zennit (https://github.com/chr5tphr/zennit): LRP composites, rule maps, canonizers and attributors.

Two tables, two small adapters:

- ``zennit.<Composite>`` (EpsilonPlus, EpsilonGammaBox, GuidedBackprop, ...): the composite,
  built from the config's params under its own constructor names, runs with zennit's
  ``Gradient`` attributor; the result is the relevance at the input ``(B, C, *spatial)``.
  ``zennit.LayerMapComposite``, ``zennit.SpecialFirstLayerMapComposite`` and
  ``zennit.NameLayerMapComposite`` build the rules from JSON (see *Rule maps*).
- ``zennit.<Attributor>`` (Gradient, SmoothGrad, IntegratedGradients, Occlusion): the
  attributor with its own params, optionally over a composite named in ``params.composite``
  (``"EpsilonPlus"`` or ``{"name": "EpsilonGammaBox", "gamma": 0.5}``).

The output seed (zennit's ``attr_output``) is the one-hot of the target over
``call.forward``'s ``(B, K)`` output (with a wrapper: the wrapped scores), so the plain
``Gradient`` is the gradient of the target score, and LRP starts with relevance 1 on it.
``Occlusion`` sums ``attr_output(output)`` as its score, so there it is the one-hot times the
output (the target score itself). The composite is registered on ``call.forward``, so with a
wrapper its elementwise activation follows the composite's activation rule too (``Pass`` for
the LRP composites: the mask, not the sigmoid's slope, seeds the logits; ``nn.Softmax`` is in
no zennit type group and is differentiated).

Rule maps (``layer_map``, ``first_map``, also accepted by the built-in composites, where they
are put before the composite's own rules): a JSON object from layer type to rule, the first
matching entry wins, in the order written::

    {"Conv2d": "epsilon", "Linear": {"rule": "gamma", "gamma": 0.25}, "BatchNorm": "pass"}

Layer types are ``torch.nn`` class names or zennit's type groups: Convolution (every conv
and transposed conv, 1D to 3D), ConvolutionStandard, ConvolutionTranspose, BatchNorm,
AvgPool, MaxPool, Activation, Sum, and ``types.Linear`` (convolutions and dense layers; a
plain ``Linear`` is ``torch.nn.Linear``). ``name_map`` (NameLayerMapComposite, matched before
its ``layer_map``) has the same form with layer names as in the user's model (``"stem.0"``;
``"relu"`` for every call of a module used at several places, ``"relu[1]"`` for its second
call); a name the model lacks is a ConfigError when the method runs. Rules (:func:`rules`, read from zennit):
epsilon (ε), gamma (γ), alpha1beta0, alpha2beta1, alphabeta (α, β given, α − β = 1), zplus
(z⁺), flat, wsquare (w²), zbox (z^B; ``low``/``high`` default to each input's min and max,
or give a number or one number per channel), pass, norm, gradient (no rule: the plain
gradient), guidedbackprop, deconvnet, betasmooth (ReLU rules). A rule's own params go next
to ``rule`` under zennit's names.

Models, 2D and 3D: zennit's groups cover Conv3d, ConvTranspose3d and BatchNorm3d, so the 3D
U-Net runs like the 2D one. What is not a module is differentiated as usual, which zennit
relies on: ``torch.cat`` splits the relevance of the skip connections by channel (conserved),
max pooling (no rule in the built-in composites) passes it to the maximum, nearest
``F.interpolate`` sums it back, and a functional residual addition copies it to both branches
(not conserved: zennit's ResNetCanonizer fixes that for torchvision's own blocks only).
Captum's LRP differs from zennit there: where a layer's input also feeds such an operation
(a residual or skip connection), Captum multiplies the relevance arriving through it by the
input again; on branch-free networks the two agree exactly (tests/test_zennit.py).

Canonizers (``params.canonizers``, names): GraphMergeBatchNorm (esegeta's: folds each
BatchNorm into the conv/linear layer whose output it takes, where nothing else takes that
output, as seen on a forward pass of the input: right across DenseNet's ``torch.cat`` and
residual blocks), SequentialMergeBatchNorm (zennit's: folds every BatchNorm that follows a
conv/linear layer in *module order*, wrong where the order differs from the data flow, e.g.
DenseNet), and, from ``zennit.torchvision``, VGGCanonizer (the same)
and ResNetCanonizer (that plus a ``Sum`` module for the residual addition of torchvision's
own ``BasicBlock``/``Bottleneck`` classes only). Default: GraphMergeBatchNorm for every
LRP composite, none for GuidedBackprop and DeconvNet (folding BN changes their gradient only
by rounding); ``[]`` turns folding off. Canonizers change the prepared copy's weights while the
call runs; zennit undoes them, and the one guard (:func:`esegeta.attribution.guard.run_guarded`) restores,
even on error, every parameter, buffer, submodule and hook of the copy.

Trace (``params.trace: true``, with the ``Gradient`` attributor: every composite and
``zennit.Gradient``): ``call.extras["trace"]`` maps each leaf layer of the model (named as in
the user's model; a module called at several places is ``name[k]``, its k-th call) to the
relevance it passes to its input: the composite-modified gradient of the model's output
seed with respect to that layer's input, through that layer only (so a tensor feeding two
layers, e.g. a residual branch, has one entry per layer), shape ``(B, *layer input shape)``.
Without a composite it is the plain gradient.

References: Bach et al. 2015, doi:10.1371/journal.pone.0130140 (LRP); Montavon et al. 2019,
doi:10.1007/978-3-030-28954-6_10 (composites); Anders et al. 2021, arXiv:2106.13200 (Zennit).
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import math
from collections.abc import Mapping
from functools import cache
from types import MappingProxyType
from typing import Any

from esegeta.errors import ConfigError, did_you_mean
from esegeta.hooks import removing
from esegeta.spec.params import check_number
from esegeta.spec import cost
from esegeta.spec.cost import Passes
from esegeta.spec.registry import PER_INPUT, ROWS, Call, Library, MethodSpec, keyword_parameters, register


#: Zennit draws from torch's RNG only (SmoothGrad's noise).
LIBRARY = Library("zennit", "zennit", "zennit", ("zennit",), uses_global_rng=False, reads_samples=False,
                  reference="Anders et al. 2021, arXiv:2106.13200")

_LRP = "Bach et al. 2015, doi:10.1371/journal.pone.0130140"
_MONTAVON = "Montavon et al. 2019, doi:10.1007/978-3-030-28954-6_10"
#: References of the composites zennit registers (optional: a new upstream composite needs none).
REFERENCES: Mapping[str, str] = {
    "EpsilonPlus": "Kohlbrenner et al. 2020, arXiv:1910.09840", "EpsilonPlusFlat": "Kohlbrenner et al. 2020, "
    "arXiv:1910.09840", "EpsilonAlpha2Beta1": _MONTAVON, "EpsilonAlpha2Beta1Flat": _MONTAVON,
    "EpsilonGammaBox": _MONTAVON, "ExcitationBackprop": "Zhang et al. 2016, arXiv:1608.00507",
    "GuidedBackprop": "Springenberg et al. 2015, arXiv:1412.6806", "DeconvNet": "Zeiler & Fergus 2014, arXiv:1311.2901",
    "BetaSmooth": "Dombrowski et al. 2019, arXiv:1906.07983",
}
#: Composites that modify gradients rather than propagate relevance: no BatchNorm folding by default
#: (it changes their result by rounding only); every other composite folds (SequentialMergeBatchNorm).
NO_CANONIZERS = frozenset({"GuidedBackprop", "DeconvNet", "BetaSmooth"})
#: zennit's composite classes that take esegeta's JSON rule maps (upstream registers none of them).
MAP_COMPOSITES = ("LayerMapComposite", "SpecialFirstLayerMapComposite", "NameLayerMapComposite")


@cache
def upstream_composites() -> tuple[str, ...]:
    """The composite classes zennit registers (``@register_composite``, ``zennit.composites.COMPOSITES``),
    read from its source without importing it (listing methods imports neither zennit nor torch)."""
    import ast
    from pathlib import Path

    found = importlib.util.find_spec("zennit")  # a top-level spec: nothing is imported
    if found is None or not found.submodule_search_locations:
        return ()
    source = Path(list(found.submodule_search_locations)[0], "composites.py").read_text(encoding="utf-8")
    return tuple(node.name for node in ast.parse(source).body if isinstance(node, ast.ClassDef) and any(
        isinstance(d, ast.Call) and getattr(d.func, "id", None) == "register_composite" for d in node.decorator_list))


def composite_names() -> tuple[str, ...]:
    return (*upstream_composites(), *MAP_COMPOSITES)


#: esegeta's canonizer: folds each BatchNorm into the layer whose output it takes, from the traced graph.
GRAPH_MERGE = "GraphMergeBatchNorm"


def _default_canonizers(name: str) -> tuple[str, ...]:
    return () if name in NO_CANONIZERS else (GRAPH_MERGE,)


def _graph_merge(call: Call):
    """A zennit canonizer folding the (layer, BatchNorm) pairs of :func:`esegeta.attribution.architectures.linear_norm_pairs`,
    found on the call's input: right for any architecture whose forward runs (DenseNet's
    ``torch.cat``, residual blocks), where SequentialMergeBatchNorm pairs by module order."""
    from esegeta.attribution.architectures import linear_norm_pairs

    base = _zennit().canonizers.MergeBatchNorm
    pairs = linear_norm_pairs(call.forward, call.inputs)

    class GraphMergeBatchNorm(base):
        def apply(self, root_module):
            inside = {id(m) for m in root_module.modules()}
            instances = []
            for linear, norm in pairs:
                if id(linear) in inside and id(norm) in inside:
                    instance = GraphMergeBatchNorm()
                    instance.register((linear,), norm)
                    instances.append(instance)
            return instances

    return GraphMergeBatchNorm()


def _occlusion_passes(values, x, layer_shape) -> Passes:
    """zennit's Occlusion rolls the window to every multiple of the stride, wrapping around the
    edges: one forward row per position, plus the unperturbed input."""
    spatial = list(x.shape[2:])
    stride = cost.as_list(values.get("stride"), len(spatial))
    if stride is None:
        return Passes(None, None, False, "stride not known")
    return Passes(math.prod(-(-s // max(1, st)) for s, st in zip(spatial, stride)) + 1, 0)


#: Attributor name → (reference, seed: "one_hot" for gradients, "score" for Occlusion, passes, axiom).
ATTRIBUTORS: Mapping[str, tuple[str, str, cost.Formula, str]] = {
    "Gradient": ("Simonyan et al. 2014, arXiv:1312.6034", "one_hot", cost.gradient, "none"),
    "SmoothGrad": ("Smilkov et al. 2017, arXiv:1706.03825", "one_hot", cost.steps("n_iter"), "none"),
    "IntegratedGradients": ("Sundararajan et al. 2017, arXiv:1703.01365", "one_hot", cost.steps("n_iter"),
                            "completeness"),
    "Occlusion": ("Zeiler & Fergus 2014, arXiv:1311.2901", "score", _occlusion_passes, "none"),
}
#: esegeta's JSON rule names that are not zennit's own (zennit.rules class, fixed keyword arguments);
#: None is the plain gradient. Every rule class zennit defines is also its lower-cased name
#: (epsilon, gamma, zplus, alphabeta, zbox, pass, norm, wsquare, flat, reluguidedbackprop, ...).
RULE_ALIASES: Mapping[str, tuple[str | None, Mapping[str, Any]]] = {
    "alpha1beta0": ("AlphaBeta", {"alpha": 1.0, "beta": 0.0}),
    "alpha2beta1": ("AlphaBeta", {"alpha": 2.0, "beta": 1.0}),
    "gradient": (None, {}),
    "guidedbackprop": ("ReLUGuidedBackprop", {}),
    "deconvnet": ("ReLUDeconvNet", {}),
    "betasmooth": ("ReLUBetaSmooth", {}),
}


@cache
def rules() -> Mapping[str, tuple[str | None, Mapping[str, Any]]]:
    """JSON rule name → (zennit.rules class, fixed arguments): zennit's rule classes, read from
    ``zennit.rules``, and esegeta's aliases."""
    zennit = _zennit()
    upstream = {name.lower(): (name, {}) for name, cls in vars(zennit.rules).items() if inspect.isclass(cls)
                and issubclass(cls, zennit.core.Hook) and cls.__module__ == "zennit.rules"}
    return MappingProxyType({**upstream, **RULE_ALIASES})


@cache
def groups() -> tuple[str, ...]:
    """zennit's type groups usable as layer types: the classes of ``zennit.types`` (read from it),
    and ``Sum`` (zennit.layer's module for additions)."""
    zennit = _zennit()
    found = [name for name, cls in vars(zennit.types).items()
             if isinstance(cls, zennit.types.SubclassMeta) and cls.__module__ == "zennit.types"]
    return (*found, "Sum")


@cache
def canonizers() -> Mapping[str, type]:
    """Canonizer name → class: every canonizer zennit ships (``zennit.canonizers``,
    ``zennit.torchvision``) that is built without arguments and implements ``apply`` (not a base)."""
    zennit = _zennit()
    base = zennit.canonizers.Canonizer
    return MappingProxyType({name: cls for module in (zennit.canonizers, zennit.torchvision)
                             for name, cls in vars(module).items()
                             if inspect.isclass(cls) and issubclass(cls, base) and cls.__module__ == module.__name__
                             and cls.apply is not base.apply and _no_arguments(cls)})


def _no_arguments(cls) -> bool:
    return all(p.default is not p.empty for name, p in inspect.signature(cls.__init__).parameters.items()
               if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


RULE_MAPS = ("layer_map", "first_map", "name_map")
NUMBERS = frozenset({"epsilon", "stabilizer", "gamma", "noise_level", "alpha", "beta", "beta_smooth"})
POSITIVE_INTS = frozenset({"n_iter"})
#: Constructor arguments esegeta supplies (or that take code, not JSON).
NOT_CONFIGURABLE = frozenset({"self", "model", "composite", "attr_output", "create_graph", "retain_graph",
                              "occlusion_fn"})
TRACE = "trace"


def _zennit():
    """Import zennit (its torchvision module needs torchvision importable on CPU-only torch)."""
    from esegeta.compat import import_torchvision

    import_torchvision()
    import zennit.attribution
    import zennit.canonizers
    import zennit.composites
    import zennit.core
    import zennit.layer
    import zennit.rules
    import zennit.torchvision
    import zennit.types

    return zennit


def _configurable(cls) -> dict[str, inspect.Parameter]:
    return keyword_parameters(cls.__init__, NOT_CONFIGURABLE)


def _flag(name: str, default: Any = False) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)


@cache
def composite_parameters(name: str) -> Mapping[str, inspect.Parameter]:
    return _configurable(getattr(_zennit().composites, name))


@cache
def attributor_parameters(name: str) -> Mapping[str, inspect.Parameter]:
    params = _configurable(getattr(_zennit().attribution, name))
    params["composite"] = _flag("composite", None)
    if name == "Gradient":  # one backward pass: its per-layer relevance is the trace
        params[TRACE] = _flag(TRACE)
    return params


@cache
def _rule_parameters(rule: str) -> frozenset[str]:
    cls_name, fixed = rules()[rule]
    if cls_name is None:
        return frozenset()
    return frozenset(_configurable(getattr(_zennit().rules, cls_name))) - set(fixed)


# ---------------------------------------------------------------------------- checks (JSON only)

def _check_bound(name: str, value: Any, path: str) -> None:
    """``low``/``high``: a number, or one number per input channel."""
    values = value if isinstance(value, list) and value else [value]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise ConfigError(path, f"{name} must be a number or a list of numbers (one per input channel), "
                                f"not {value!r}")


def _check_window(name: str, value: Any, path: str) -> None:
    values = value if isinstance(value, list) and value else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(path, f"{name} must be a positive integer or a list of them (one per spatial axis, "
                                f"or per axis after the batch), not {value!r}")


def _check_zero_params(name: str, value: Any, path: str) -> None:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in values):
        raise ConfigError(path, f"{name} must be a parameter name or a list of them, e.g. [\"bias\"]")


def _check_bool(name: str, value: Any, path: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(path, f"{name} must be true or false, not {value!r}")


def _check_canonizers(name: str, value: Any, path: str) -> None:
    if not isinstance(value, list):
        raise ConfigError(path, f"canonizers must be a list of names, e.g. [\"SequentialMergeBatchNorm\"]; "
                                f"known: {', '.join(canonizers())}")
    known = (*canonizers(), GRAPH_MERGE)
    for i, item in enumerate(value):
        if item not in known:
            raise ConfigError(f"{path}[{i}]", f"unknown canonizer {item!r}" + did_you_mean(str(item), known))


def _layer_types() -> list[str]:
    from torch import nn

    names = [n for n, c in vars(nn).items() if isinstance(c, type) and issubclass(c, nn.Module)]
    return names + [g for g in groups() if g not in names] + [f"types.{g}" for g in groups()]


def _check_rule_map(name: str, value: Any, path: str) -> None:
    """A rule map: {layer type (or, in name_map, layer name): rule name or {"rule": name, **rule params}}."""
    if not isinstance(value, dict) or not value:
        example = ('{"stem.0": "zbox", "fc": "epsilon"}' if name == "name_map" else
                   '{"Conv2d": "epsilon", "Linear": {"rule": "gamma", "gamma": 0.25}, "BatchNorm": "pass"}')
        raise ConfigError(path, f"{name} maps layer {'names' if name == 'name_map' else 'types'} to rules, "
                                f"e.g. {example}")
    types = _layer_types()
    for type_name, rule in value.items():
        where = f"{path}.{type_name}"
        if name != "name_map" and type_name not in types:  # layer names are checked on the model
            raise ConfigError(where, f"unknown layer type {type_name!r} (a torch.nn class name or one of zennit's "
                                     f"groups {', '.join(groups())})" + did_you_mean(type_name, types))
        options = dict(rule) if isinstance(rule, dict) else {"rule": rule}
        rule_name = options.pop("rule", None)
        if not isinstance(rule_name, str):
            raise ConfigError(where, 'a rule is a name ("epsilon") or {"rule": "gamma", "gamma": 0.25}')
        if rule_name not in rules():
            raise ConfigError(where, f"unknown rule {rule_name!r}" + did_you_mean(rule_name, rules()))
        allowed = _rule_parameters(rule_name)
        for key, option in options.items():
            if key not in allowed:
                raise ConfigError(f"{where}.{key}", f"unknown parameter of the {rule_name} rule"
                                  + (did_you_mean(key, allowed) if allowed else "; it takes none"))
            _check_value(key, option, f"{where}.{key}")
        if rule_name == "alphabeta":  # zennit's own condition, checked before anything runs
            alpha, beta = options.get("alpha", 2.0), options.get("beta", 1.0)
            if alpha < 0 or beta < 0 or alpha - beta != 1:
                raise ConfigError(where, f"the alphabeta rule needs alpha - beta = 1 with both >= 0 (got alpha={alpha}, "
                                         f"beta={beta}), e.g. {{\"rule\": \"alphabeta\", \"alpha\": 3, \"beta\": 2}}")


def _check_composite(name: str, value: Any, path: str) -> None:
    """``composite`` of an attributor: a composite's name or {"name": ..., **its params}."""
    options = dict(value) if isinstance(value, dict) else {"name": value}
    composite = options.pop("name", None)
    if composite not in composite_names():
        raise ConfigError(path, f"unknown composite {composite!r}" + did_you_mean(str(composite), composite_names())
                          + ' (write a name, or {"name": "EpsilonGammaBox", "gamma": 0.5})')
    allowed = composite_parameters(composite)
    for key, option in options.items():
        if key not in allowed:
            raise ConfigError(f"{path}.{key}", f"unknown parameter of {composite}" + did_you_mean(key, allowed))
        _check_value(key, option, f"{path}.{key}")
    for key, p in allowed.items():
        if p.default is p.empty and key not in options and key not in INPUT_DEFAULTS:
            raise ConfigError(path, f"{composite} needs {key}: write {{\"name\": \"{composite}\", \"{key}\": ...}}")


CHECKS = {
    **dict.fromkeys(NUMBERS | POSITIVE_INTS, lambda name, value, path: check_number(name, value, path, POSITIVE_INTS)),
    "low": _check_bound, "high": _check_bound, "window": _check_window, "stride": _check_window,
    "zero_params": _check_zero_params, TRACE: _check_bool, "canonizers": _check_canonizers,
    **{n: _check_rule_map for n in RULE_MAPS}, "composite": _check_composite,
}


def _check_value(name: str, value: Any, path: str) -> None:
    from esegeta.attribution.baselines import check_baseline

    if name == "baseline_fn":
        if isinstance(value, list):
            raise ConfigError(path, "baseline_fn is one baseline: a number or a name (zeros, mean, min, blur, blur:SIGMA)")
        check_baseline(value, path)
    elif name == "branches":
        from esegeta.attribution.rules import check_branches

        check_branches(value, path)
    elif name in CHECKS:
        CHECKS[name](name, value, path)


# ---------------------------------------------------------------------------- JSON → zennit objects

def _per_sample(x, reduce):
    return reduce(x.flatten(1), dim=1).view(-1, *([1] * (x.ndim - 1)))


def _low(x):
    """ZBox's lowest input value by default: each input's minimum."""
    import torch

    return _per_sample(x, torch.amin)


def _high(x):
    """ZBox's highest input value by default: each input's maximum."""
    import torch

    return _per_sample(x, torch.amax)


#: Upstream params without a default that esegeta derives from the input.
INPUT_DEFAULTS = {"low": _low, "high": _high}


def _bound(value: Any, x):
    """A JSON ``low``/``high`` as a tensor broadcastable to the input."""
    import torch

    if torch.is_tensor(value):
        return value
    tensor = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    return tensor.view(1, -1, *([1] * (x.ndim - 2))) if tensor.ndim == 1 else tensor


def _layer_type(name: str):
    import zennit.layer
    import zennit.types
    from torch import nn

    group = name.removeprefix("types.")
    if name == group and isinstance(getattr(nn, name, None), type):
        return getattr(nn, name)
    return zennit.layer.Sum if group == "Sum" else getattr(zennit.types, group)


def _rule(spec: Any, x):
    zennit = _zennit()
    options = dict(spec) if isinstance(spec, dict) else {"rule": spec}
    cls_name, fixed = rules()[options.pop("rule")]
    if cls_name is None:
        return None
    if cls_name == "ZBox":
        options = {key: _bound(options[key], x) if key in options else INPUT_DEFAULTS[key](x)
                   for key in ("low", "high")} | {k: v for k, v in options.items() if k not in ("low", "high")}
    return getattr(zennit.rules, cls_name)(**fixed, **options)


def _rule_map(value: Mapping[str, Any], x, keys=None) -> list:
    """zennit's rule map: a list of (layer types, or layer names in the model, rule)."""
    return [((keys or _layer_type)(key), _rule(rule, x)) for key, rule in value.items()]


def _name_resolver(call: Call, path: str):
    """User layer name (``relu[1]`` for a call site) → the names zennit sees under ``call.forward``.

    A module split into call sites by esegeta's preparation stands for all of its sites.
    """
    from esegeta.attribution.prepare import CallSites

    network = _network(call)
    prefix = next(name for name, module in call.forward.named_modules() if module is network)
    table: dict[str, tuple[str, ...]] = {}
    for name, (where, module) in _named(network):
        full = f"{prefix}.{where}" if prefix else where
        table[name] = (tuple(f"{full}.sites.{k}" for k in range(len(module.sites)))
                       if isinstance(module, CallSites) else (full,))

    def resolve(name: str) -> tuple[str, ...]:
        if name not in table:
            raise ConfigError(f"{path}.{name}", f"the model has no layer {name!r}" + did_you_mean(name, table))
        return table[name]

    return resolve


def _canonizers(names, call: Call) -> list:
    return [_graph_merge(call) if n == GRAPH_MERGE else canonizers()[n]() for n in names]


def build_composite(name: str, params: Mapping[str, Any], call: Call, path: str = "params"):
    """The composite ``name`` from JSON params (rule maps, canonizers, bounds converted; defaults filled)."""
    x = call.inputs
    kwargs = dict(params)
    for key in RULE_MAPS:
        if key in kwargs:
            names = _name_resolver(call, f"{path}.{key}") if key == "name_map" else None
            kwargs[key] = _rule_map(kwargs[key], x, names)
        elif key in composite_parameters(name):
            kwargs[key] = []  # NameLayerMapComposite's None maps would fail upstream: no rules
    kwargs["canonizers"] = _canonizers(kwargs.get("canonizers", _default_canonizers(name)), call)
    for key, default in INPUT_DEFAULTS.items():
        if key in composite_parameters(name):
            kwargs[key] = _bound(kwargs[key], x) if key in kwargs else default(x)
    if "zero_params" in kwargs and isinstance(kwargs["zero_params"], str):
        kwargs["zero_params"] = [kwargs["zero_params"]]
    return getattr(_zennit().composites, name)(**kwargs)


def _seed(call: Call, kind: str):
    """zennit's ``attr_output``: the target's one-hot over the (B, K) output (times it for "score")."""
    target = call.targets

    def seed(output):
        if target is None:  # a forward whose output is each row's explained score (global patches' share)
            return output.new_ones(output.shape)
        one_hot = target.one_hot(output)
        return one_hot * output if kind == "score" else one_hot

    return seed


# ---------------------------------------------------------------------------- running, restoring, tracing

def _network(call: Call):
    """The user's model inside the prepared copy (names as the user knows them)."""
    from esegeta.attribution.prepare import PreparedModel

    return call.network.model if isinstance(call.network, PreparedModel) else call.network


def _named(root) -> list[tuple[str, tuple[str, Any]]]:
    """(user name, (module path, module)) of every submodule; the k-th call site of a module that
    esegeta's preparation split (a ReLU used twice) is ``name[k]``."""
    import re

    return [(re.sub(r"\.sites\.(\d+)", r"[\1]", name), (name, module)) for name, module in root.named_modules()
            if name and not name.endswith(".sites")]


def _leaves(root) -> list[tuple[str, Any]]:
    """Leaf modules with the user's names."""
    return [(name, module) for name, (_, module) in _named(root) if not list(module.children())]


@contextlib.contextmanager
def _tracing(root, enabled: bool):
    """Record the relevance each leaf layer passes to its input (see the module docstring).

    A forward pre-hook, first in line (before zennit's own), puts a view of the layer's input
    in front of the layer and hooks its gradient: that is what this layer alone returns for
    its input. The module hooks are removed on exit; the tensor hooks die with the graph.
    """
    trace: dict[str, Any] = {}
    if not enabled:
        yield trace
        return
    import torch

    def pre_hook(name):
        def hook(module, args):
            if not args or not torch.is_tensor(args[0]) or not args[0].requires_grad:
                return None
            view = args[0].view_as(args[0])
            view.register_hook(lambda grad: trace.__setitem__(name, trace.get(name, 0) + grad.detach()))
            return (view, *args[1:])
        return hook

    leaves = _leaves(root)
    with removing() as handles:
        handles.extend(module.register_forward_pre_hook(pre_hook(name), prepend=True) for name, module in leaves)
        yield trace
    ordered = {name: trace[name] for name, _ in leaves if name in trace}
    trace.clear()
    trace.update(ordered)


#: zennit's ε on the wrapper's masked sum (:func:`_wrapper_head_rule`).
HEAD_EPSILON = 1e-6
#: Rules whose relevance is not linear in the relevance they receive (they clip its sign).
SEED_NONLINEAR_RULES = frozenset({"guidedbackprop", "deconvnet", "reluguidedbackprop", "reludeconvnet"})


def seed_linear(params: Mapping[str, Any]) -> bool:
    """Whether a composite entry's relevance at the input is linear in the relevance seeded at the
    output (for fixed forward activations), and one call gives all it records: every rule but the
    ReLU rules that clip the gradient's sign, and no ``trace`` (per-layer relevance of one call).
    What global patch mode's streamed LRP needs (:func:`esegeta.attribution.streamed.zennit_lrp`)."""
    if params.get(TRACE):
        return False
    for key in RULE_MAPS:
        for rule in (params.get(key) or {}).values():
            if (rule.get("rule") if isinstance(rule, dict) else rule) in SEED_NONLINEAR_RULES:
                return False
    return True


def volume_bounds(name: str, params: Mapping[str, Any], x) -> dict[str, Any]:
    """``params`` with the z^B rule's default bounds (``low``/``high``: each input's min and max)
    taken from the whole input ``x``, for the composite and for every ``zbox`` rule of its maps:
    explained patch by patch, a patch's own extremes are not the input's."""
    params = dict(params)
    for key, default in INPUT_DEFAULTS.items():
        if key in composite_parameters(name) and key not in params:
            params[key] = default(x)
    for key in RULE_MAPS:
        if key in params:
            params[key] = {layer: _volume_bounded(rule, x) for layer, rule in params[key].items()}
    return params


def _volume_bounded(rule: Any, x) -> Any:
    options = dict(rule) if isinstance(rule, dict) else {"rule": rule}
    if rules().get(options["rule"], (None,))[0] != "ZBox":
        return rule
    return {**{key: default(x) for key, default in INPUT_DEFAULTS.items() if key not in options}, **options}


def head_activation_rule(name: str, params: Mapping[str, Any], call: Call, activation):
    """The zennit hook (a fresh copy) an LRP composite entry ``name`` puts on the wrapper's
    ``activation`` when it runs on the whole wrapped model, None for none (its gradient):
    ``Pass`` on a softmax (:func:`_wrapper_head_rule`), else the composite's own mapping (the
    composite built without canonizers: nothing runs)."""
    zennit = _zennit()
    if type(activation).__name__ == "Softmax":
        return zennit.rules.Pass()
    composite = build_composite(name, {**params, "canonizers": []}, call)
    template = composite.module_map({}, "", activation)
    return None if template is None else template.copy()


@contextlib.contextmanager
def _wrapper_head_rule(call: Call, lrp: bool):
    """Within the block, for an LRP composite on a wrapped segmenter: ``Pass`` on the wrapper's
    softmax (see the module docstring) and zennit's ε rule on the wrapper's masked sum
    (:class:`esegeta.attribution.wrappers.MaskSum`, linear in the activated output), so each pixel
    gets its share ``A·M / score`` of the seed. No composite maps that module; without a rule the
    relevance entering the model is the gradient ``M``, and it adds up to the seed times the mask's
    pixel count. Removed on exit."""
    heads = [m for m in call.forward.modules() if type(m).__name__ == "MaskSum"] if lrp else []
    softmaxes = [m.activation for m in call.forward.modules()
                 if type(m).__name__ == "MaskedScore" and type(m.activation).__name__ == "Softmax"] if lrp else []
    with removing() as handles:
        for head in heads:
            handles.append(_zennit().rules.Epsilon(epsilon=HEAD_EPSILON).register(head))
        for softmax in softmaxes:
            handles.append(_zennit().rules.Pass().register(softmax))
        yield


@contextlib.contextmanager
def _norm_rule(call: Call, composite, lrp: bool):
    """Within the block, for an LRP composite: zennit's ``Pass`` rule on the normalisation layers it
    maps to no rule (no composite does: they would pass relevance as their gradient, scaled by 1/std).
    With their standard deviation held constant (:mod:`esegeta.attribution.rules`) they are
    elementwise in relevance terms, and each element keeps its relevance. Removed on exit."""
    from esegeta.attribution.architectures import normalisation

    if not lrp:
        yield
        return

    def unmapped(name, module):
        try:
            return composite.module_map({}, name, module) is None
        except Exception:  # noqa: BLE001 (a composite that cannot say: leave the layer to it)
            return False

    with removing() as handles:
        for name, module in call.network.named_modules():
            if normalisation(module) and unmapped(name, module):
                handles.append(_zennit().rules.Pass().register(module))
        yield


def _attribute(attributor_cls, call: Call, composite, seed_kind: str, trace: bool, lrp: bool = False, **kwargs):
    """Run one zennit attributor on ``call.forward`` (``lrp``: the composite is an LRP one)."""
    attributor = attributor_cls(call.forward, composite=composite, attr_output=_seed(call, seed_kind), **kwargs)
    with (_tracing(_network(call), trace) as recorded, _wrapper_head_rule(call, lrp),
          _norm_rule(call, composite, lrp and composite is not None), attributor):
        _, attribution = attributor(call.inputs)
    if trace:
        call.extras["trace"] = recorded
    return attribution


def _finite(spec: MethodSpec, call: Call, relevance):
    """``relevance``, or an error naming the cause where it overflowed float32 (in reduced
    precision it is returned as it is: the run retries in float32)."""
    import torch

    device = call.inputs.device.type
    if (device == "meta" or relevance.dtype != torch.float32 or torch.isfinite(relevance).all()
            or (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device))):
        return relevance
    raise FloatingPointError(
        f"{spec.id}: the relevance overflowed float32: a rule dividing by the layer's output (epsilon, norm) "
        "multiplies the relevance by 1/z where z is near zero, and over many layers without a ReLU to bound it "
        "(LeakyReLU, GELU, normalisation layers passing their gradient) it compounds; give the epsilon rule a "
        "stabiliser the size of the outputs, e.g. {\"rule\": \"epsilon\", \"epsilon\": 0.25}, or use zplus/gamma "
        "rules (as zennit.EpsilonPlus does on convolutions)")


class _ZennitAdapter:
    """What zennit's two adapters share: the JSON checks of their values, and what global patch mode's
    streamed algorithms read of zennit (:mod:`esegeta.attribution.streamed`, below this module, finds
    them on the spec's adapter): the masked sum's ε, whether a request's relevance is linear in its seed,
    the z^B bounds of the whole input, the rule on the wrapper's activation."""

    head_epsilon = HEAD_EPSILON
    seed_linear = staticmethod(seed_linear)
    volume_bounds = staticmethod(volume_bounds)
    head_activation_rule = staticmethod(head_activation_rule)

    def check_value(self, name: str, value: Any, path: str) -> None:
        _check_value(name, value, path)


class CompositeAdapter(_ZennitAdapter):
    """A zennit composite run with the ``Gradient`` attributor (LRP and modified gradients)."""

    #: LRP starts from the target's one-hot: relevance adds up to 1 (:mod:`esegeta.attribution.conservation`).
    relevance_seed = "one"

    def parameters(self, spec: MethodSpec) -> Mapping[str, inspect.Parameter]:
        from esegeta.attribution.rules import BRANCHES

        lrp = {BRANCHES: _flag(BRANCHES, "auto")} if spec.axiom == "conservation" else {}
        return {**composite_parameters(spec.name), TRACE: _flag(TRACE), **lrp}

    def streams(self, spec: MethodSpec) -> str | None:
        """The streamed algorithm of global patch mode: every composite that conserves relevance."""
        return None if spec.name in NO_CANONIZERS else "zennit_lrp"

    def run(self, spec: MethodSpec, call: Call):
        from esegeta.attribution.rules import BRANCHES

        params = dict(call.params)
        trace = params.pop(TRACE, False)
        params.pop(BRANCHES, None)  # read by the substitutes (esegeta.attribution.rules)
        composite = build_composite(spec.name, params, call)
        return _finite(spec, call, _attribute(_zennit().attribution.Gradient, call, composite, "one_hot", trace,
                                              lrp=spec.axiom == "conservation"))


class AttributorAdapter(_ZennitAdapter):
    """A zennit attributor, optionally over a composite named in ``params.composite``."""

    def parameters(self, spec: MethodSpec) -> Mapping[str, inspect.Parameter]:
        return attributor_parameters(spec.name)

    def streams(self, spec: MethodSpec) -> str | None:
        """The streamed algorithm of global patch mode (used without a composite, trace or noise tunnel)."""
        return {"Gradient": "zennit_gradient", "IntegratedGradients": "zennit_integrated_gradients"}.get(spec.name)

    def run(self, spec: MethodSpec, call: Call):
        import torch

        from esegeta.attribution.baselines import make_baselines

        params = dict(call.params)
        trace = params.pop(TRACE, False)
        composite = params.pop("composite", None)
        if composite is not None:
            options = dict(composite) if isinstance(composite, dict) else {"name": composite}
            composite = build_composite(options.pop("name"), options, call, "params.composite")
        if "baseline_fn" in params:
            value = params.pop("baseline_fn")
            params["baseline_fn"] = lambda x: torch.zeros_like(x) + make_baselines(value, x, "params.baseline_fn")
        for key in ("window", "stride"):
            if isinstance(params.get(key), list):
                params[key] = tuple(params[key])
        cls = getattr(_zennit().attribution, spec.name)
        lrp = composite is not None and type(composite).__name__ not in NO_CANONIZERS
        return _attribute(cls, call, composite, ATTRIBUTORS[spec.name][1], trace, lrp=lrp, **params)


COMPOSITE_ADAPTER = CompositeAdapter()
ATTRIBUTOR_ADAPTER = AttributorAdapter()


def _halves(x) -> list[int]:
    """An occlusion window (and stride) of half of each spatial axis: 2**dims windows."""
    return [-(-s // 2) for s in x.shape[2:]]


_ATTRIBUTOR_QUICK = {"SmoothGrad": {"n_iter": 3}, "IntegratedGradients": {"n_iter": 5},
                     "Occlusion": {"window": _halves, "stride": _halves}}


#: Composites with rules only for ReLU-like activations: they hook no linear layer, so attention is no obstacle.
ACTIVATION_ONLY = frozenset({"GuidedBackprop", "DeconvNet", "BetaSmooth", "ExcitationBackprop"})


def attention_gap(model, context=None) -> list[str]:
    """The pre-flight check of zennit's rule composites: attention the LRP-conservative substitutes
    do not cover (:func:`esegeta.attribution.rules.unsupported_attention`; the others run with their
    softmax weights constant and their projections as ``nn.Linear`` modules the rules see)."""
    from esegeta.attribution.rules import unsupported_attention

    unsupported = unsupported_attention(model)
    if not unsupported:
        return []
    return [f"zennit has no rule for attention ({unsupported[0]}{' and more' if len(unsupported) > 1 else ''}): "
            "esegeta holds the softmax weights of plain attention constant (AttnLRP), not with extra key/value "
            "biases or a zero-attention row; use zennit.Gradient, zennit.IntegratedGradients, or gradcam.GradCAM "
            "with params.reshape_transform \"vit\""]


def entry_canonizers(method: str, params: Mapping[str, Any]) -> tuple[str, ...]:
    """The canonizer names an entry of zennit's ``method`` will apply: its composite's own (the
    method's, or the one ``params.composite`` names), else the adapter's default for that composite."""
    composite = params.get("composite")
    if isinstance(composite, dict):
        name, options = composite.get("name"), composite
    elif isinstance(composite, str):
        name, options = composite, {}
    else:
        name, options = method, params
    if name not in composite_names():
        return ()
    names = options.get("canonizers", _default_canonizers(name))
    return tuple(n for n in names if isinstance(n, str))


def try_canonizers(model, context) -> tuple[list[ConfigError], list[str]]:
    """The trial of zennit's methods (``MethodSpec.trial``, run by ``esegeta check``): apply the
    canonizers the entry will use to a copy of the prepared ``model``, as the adapter builds them
    (a graph-traced canonizer reads its layers), and run it once on ``context.x``. A canonizer that
    fails or changes the model's output is a problem before the run: ``(problems, notes)``."""
    import copy

    import torch

    names = entry_canonizers(context.spec.name, context.params)
    if not names:
        return [], []
    where = "params.canonizers"
    fix = "set params.canonizers to [] (no canonizer) or others that fit the model"
    x = context.x
    trial = copy.deepcopy(model)
    try:
        with removing() as handles:
            for canonizer in _canonizers(names, Call(trial, trial, x, None, None, {})):
                handles += canonizer.apply(trial)
            with torch.no_grad():
                expected, out = model(x), trial(x)
        if torch.is_tensor(out) and torch.is_tensor(expected) and (
                out.shape != expected.shape
                or (out - expected).abs().max() > 1e-3 * expected.abs().max() + 1e-5):  # merged weights round
            return [ConfigError(where, f"the canonizers {list(names)} change the model's output on this input; {fix}")], []
        return [], [f"canonizers {list(names)} tried on a copy of the model: output unchanged"]
    except Exception as exc:  # noqa: BLE001 (what the run would meet)
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        return [ConfigError(where, f"the canonizers {list(names)} fail on this model: {type(exc).__name__}: {detail}; "
                                   + fix)], []


#: The methods that explain a batch of wrapped inputs as rows (tests/test_batching.py checks each);
#: every other composite and attributor runs one input per call (SmoothGrad draws noise; the
#: composites' batched relevance was not declared).
BATCH_ROWS = frozenset({"DeconvNet", "Gradient", "IntegratedGradients", "Occlusion"})


def _zennit_method(name: str, adapter, reference: str, passes, axiom: str, defaults=None, quick=None) -> None:
    rule_based = adapter is COMPOSITE_ADAPTER and name not in ACTIVATION_ONLY
    register(MethodSpec(
        library=LIBRARY, name=name, kind="attribution", adapter=adapter, defaults=defaults or {},
        quick_params=quick or {}, reference=reference, preflight=attention_gap if rule_based else None,
        passes=passes, batch_layout=ROWS if name in BATCH_ROWS else PER_INPUT, axiom=axiom, trial=try_canonizers,
    ))


#: ε = 0.25 (Montavon et al. 2019's choice for middle layers): with zennit's default 1e-6 the
#: relevance overflows float32 on deep networks without ReLUs (SwinUNETR).
_EPSILON = {"rule": "epsilon", "epsilon": 0.25}
_RULE_MAP_QUICK = {"layer_map": {"Convolution": _EPSILON, "Linear": _EPSILON, "BatchNorm": "pass",
                                 "Activation": "pass", "AvgPool": "norm"}}
_QUICK = {"LayerMapComposite": _RULE_MAP_QUICK,
          "SpecialFirstLayerMapComposite": {**_RULE_MAP_QUICK, "first_map": {"Convolution": "zbox"}},
          "NameLayerMapComposite": _RULE_MAP_QUICK}
# A composite (a new upstream one too) is one modified gradient; it conserves relevance unless it
# only modifies gradients (GuidedBackprop, DeconvNet, BetaSmooth: NO_CANONIZERS).
for _name in composite_names():
    _zennit_method(_name, COMPOSITE_ADAPTER, REFERENCES.get(_name, _LRP), cost.gradient,
                   "none" if _name in NO_CANONIZERS else "conservation",
                   defaults=INPUT_DEFAULTS if _name == "EpsilonGammaBox" else None, quick=_QUICK.get(_name))
for _name, (_reference, _, _passes, _axiom) in ATTRIBUTORS.items():
    _zennit_method(_name, ATTRIBUTOR_ADAPTER, _reference, _passes, _axiom, quick=_ATTRIBUTOR_QUICK.get(_name))
