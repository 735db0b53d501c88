"""What real architectures need from esegeta, found before a method runs.

- :func:`refusals` / :func:`refuse`: each method may state a pre-flight check
  (:attr:`esegeta.spec.registry.MethodSpec.preflight`): a function of the prepared model and a
  :class:`Context` (the example input, the layer, the params) returning problems, each naming
  the offending layer and the fix (another method, a parameter, a canonizer,
  ``reshape_transform`` for token layers). ``validate``/``run`` (through the plan), ``check``
  and ``explain`` refuse the entry with them before anything runs upstream.
- :func:`linear_norm_pairs`: the (layer, BatchNorm) pairs a canonizer may fold, read from the
  data flow of one forward pass rather than from module order (zennit's default pairs a
  convolution with the next BatchNorm in module order, which is wrong across DenseNet's
  ``torch.cat``).
- :func:`products`: where the model multiplies two paths that both depend on the input (a
  squeeze-excitation or attention gate), traced: DeepLift's rules pass such a product as its
  gradient.
- :func:`extend_deeplift_rules`: DeepLift's rescale rule for the activations modern
  architectures use (SiLU, GELU, Hardswish...), so summation to delta holds through them;
  :func:`axiom_notes`: where it still holds only approximately (``check`` shows them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from esegeta.errors import ConfigError
from esegeta.hooks import removing

log = logging.getLogger("esegeta")


@dataclass
class Context:
    """What a pre-flight check may look at besides the model."""
    x: torch.Tensor
    layer: str | tuple[str, ...] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    wrapper: Any = None
    _layer_shape: tuple[int, ...] | None = None
    model: nn.Module | None = None
    spec: Any = None

    def layer_shape(self) -> tuple[int, ...] | None:
        """The layer's output shape on ``x`` (one forward pass without gradients, remembered); None
        for several layers (a method that fuses them)."""
        if self._layer_shape is None and isinstance(self.layer, str) and self.model is not None:
            seen: list[Any] = []
            try:
                module = self.model.get_submodule(self.layer)
            except AttributeError:
                return None
            with removing(module.register_forward_hook(lambda m, i, o: seen.append(o))), torch.no_grad():
                self.model(self.x[:1])
            if seen and torch.is_tensor(seen[0]):
                self._layer_shape = tuple(seen[0].shape)
        return self._layer_shape


Preflight = Callable[[nn.Module, Context], list[str]]


def network(ready: nn.Module) -> nn.Module:
    """The user's model inside a prepared copy (names as the user knows them)."""
    return getattr(ready, "model", ready)


def refusals(spec, ready: nn.Module, x: torch.Tensor, *, layer: str | None = None,
             params: Mapping[str, Any] | None = None, wrapper: Any = None) -> list[str]:
    """Why ``spec`` cannot run on the prepared model ``ready`` with this layer and params (empty: it can)."""
    model = network(ready)
    context = Context(x, layer, dict(params or {}), wrapper, model=model, spec=spec)
    found: list[str] = []
    if spec.preflight is not None:
        try:
            found += spec.preflight(model, context)
        except Exception as exc:  # noqa: BLE001 (a check that cannot decide refuses nothing: the run reports)
            log.debug("%s: pre-flight check could not decide: %s: %s", spec.id, type(exc).__name__, exc)
    return found


def refuse(spec, ready: nn.Module, x: torch.Tensor, where: str, **kw: Any) -> None:
    """A ConfigError at ``where`` with every reason of :func:`refusals`, if there is one."""
    found = refusals(spec, ready, x, **kw)
    if not found:
        return
    # a check that names its own field (esegeta.CAM's "layer") keeps it in the runner's "methods[i]." form
    fields = {p.path for p in found if isinstance(p, ConfigError)}
    if len(fields) == 1 and len(found) == 1:
        field_name = fields.pop()
        where = f"{where.rsplit('.', 1)[0]}.{field_name}" if where.startswith("methods[") else field_name
    raise ConfigError(where, f"{spec.id} cannot run on this model: "
                             + "; ".join(p.message if isinstance(p, ConfigError) else str(p) for p in found))


def leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules with their names (the first name of a module registered under several)."""
    return [(name, m) for name, m in model.named_modules() if name and not list(m.children())]


#: Layers whose output a following BatchNorm may be folded into (weight and bias: conv, transposed conv, linear).
_FOLDABLE = (nn.Linear, nn.modules.conv._ConvNd)


class _Consumers(torch.overrides.TorchFunctionMode):
    """Counts the torch operations that take each watched tensor and return a tensor (metadata
    reads such as ``.shape`` return none and are not counted)."""

    def __init__(self, watched: dict[int, Any]):
        super().__init__()
        self.watched = watched
        self.count: dict[int, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if torch.is_tensor(result) or isinstance(result, (tuple, list)):
            for arg in (*args, *(kwargs or {}).values()):
                for t in (arg if isinstance(arg, (tuple, list)) else (arg,)):
                    if torch.is_tensor(t) and id(t) in self.watched and self.watched[id(t)] is t:
                        self.count[id(t)] = self.count.get(id(t), 0) + 1
        return result


def linear_norm_pairs(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, nn.Module]]:
    """(layer, BatchNorm) pairs where the BatchNorm's input is that layer's output and nothing else
    takes that output, seen on one forward pass of ``x``: the pairs a BatchNorm can be folded
    into (what zennit's SequentialMergeBatchNorm guesses from module order, which is wrong
    across a ``torch.cat``, as in DenseNet, or where the layer's output also feeds a skip)."""
    outputs: dict[int, Any] = {}
    producer: dict[int, nn.Module] = {}
    inputs: list[tuple[nn.Module, Any]] = []

    def after_linear(module, args, output):
        if torch.is_tensor(output):
            outputs[id(output)] = output
            producer[id(output)] = module

    def before_norm(module, args):
        if args and torch.is_tensor(args[0]):
            inputs.append((module, args[0]))

    counter = _Consumers(outputs)
    with removing() as handles:
        for m in model.modules():
            if isinstance(m, _FOLDABLE) and getattr(m, "weight", None) is not None:
                handles.append(m.register_forward_hook(after_linear))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.affine:
                handles.append(m.register_forward_pre_hook(before_norm))
        with torch.no_grad(), counter:
            model(x[:1])
    pairs, used = [], set()
    for norm, tensor in inputs:
        linear = producer.get(id(tensor))
        if (linear is not None and outputs.get(id(tensor)) is tensor and counter.count.get(id(tensor)) == 1
                and id(norm) not in used and id(linear) not in used):
            pairs.append((linear, norm))
            used |= {id(norm), id(linear)}
    return pairs


#: Elementwise activations DeepLift's rescale rule covers (multiplier Δout/Δin, exact for any
#: elementwise function, so summation to delta holds through them) that Captum's
#: ``SUPPORTED_NON_LINEAR`` and SHAP's ``op_handler`` lack: without an entry, both take the
#: gradient at the input, and the attributions no longer sum to the output difference.
DEEPLIFT_RESCALE = ("SiLU", "GELU", "Hardswish", "Hardsigmoid", "Mish", "ReLU6", "Hardtanh", "PReLU", "SELU", "CELU",
                    "ELU", "LeakyReLU", "Softplus")
_rules_lock = threading.Lock()
_rules_added = False


def extend_deeplift_rules() -> None:
    """Give Captum's DeepLift and SHAP's DeepExplainer the rescale rule for the activations of
    :data:`DEEPLIFT_RESCALE` (once per process; entries only added, so every call, also one
    running beside, computes the same as before for the layers upstream already covered)."""
    global _rules_added
    with _rules_lock:
        if _rules_added:
            return
        _rules_added = True
        added = []
        try:
            from captum.attr._core import deep_lift

            for name in DEEPLIFT_RESCALE:
                cls = getattr(nn, name, None)
                if cls is not None and cls not in deep_lift.SUPPORTED_NON_LINEAR:
                    deep_lift.SUPPORTED_NON_LINEAR[cls] = deep_lift.nonlinear
                    added.append(f"captum {name}")
        except ImportError:
            pass
        try:
            from shap.explainers._deep import deep_pytorch

            for name in DEEPLIFT_RESCALE:
                if name not in deep_pytorch.op_handler:
                    deep_pytorch.op_handler[name] = deep_pytorch.nonlinear_1d
                    added.append(f"shap {name}")
        except ImportError:
            pass
        if added:
            log.debug("DeepLift rescale rule added for %s", ", ".join(added))


#: Torch functions that multiply (or divide) their tensor arguments.
_PRODUCT_OPS = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__",
                          "__rtruediv__", "__itruediv__", "matmul", "__matmul__", "__rmatmul__", "bmm", "einsum",
                          "addcmul", "addcdiv", "baddbmm", "scaled_dot_product_attention",
                          "multi_head_attention_forward"})


class _DataFlow(torch.overrides.TorchFunctionMode):
    """Follows which tensors depend on the input through one forward pass, and records the
    modules where a product takes two of them (a gate: squeeze-excitation, attention)."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.dependent: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.dependent[id(x)] = x
        self.stack: list[str] = []
        self.found: dict[str, None] = {}
        self.softmax: set[str] = set()  # modules that apply a softmax (or fused attention) themselves

    def enter(self, label: str) -> None:
        self.stack.append(label)

    def leave(self) -> None:
        if self.stack:
            self.stack.pop()

    def _tracked(self, value) -> int:
        if torch.is_tensor(value):
            return int(self.dependent.get(id(value)) is value)
        if isinstance(value, (tuple, list)):
            return sum(self._tracked(v) for v in value)
        return 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        n = self._tracked(args) + self._tracked(tuple(kwargs.values()))
        if n and getattr(func, "__name__", "") in ("softmax", "scaled_dot_product_attention"):
            self.softmax.add(self.stack[-1] if self.stack else "(the model's forward)")
        if n:
            if n >= 2 and getattr(func, "__name__", "") in _PRODUCT_OPS:
                self.found.setdefault(self.stack[-1] if self.stack else "(the model's forward)")
            for out in (result if isinstance(result, (tuple, list)) else (result,)):
                if torch.is_tensor(out):
                    try:
                        self.dependent[id(out)] = out
                    except TypeError:
                        pass
        return result


def products(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The modules (innermost, as ``name (Type)``) in which a product or quotient takes two
    tensors that both depend on the input: a squeeze-excitation or attention gate, seen on one
    forward pass of ``x``. DeepLift's rules (Captum's, SHAP's) pass such a product as its
    gradient, so summation to delta does not hold through it."""
    return list(_traced(model, x).found)


def _traced(model: nn.Module, x: torch.Tensor) -> _DataFlow:
    """The data flow of one forward pass of ``x`` (:class:`_DataFlow`), module by module."""
    names = {id(m): n for n, m in model.named_modules()}
    x = x[:1]
    flow = _DataFlow(x)
    with removing() as handles:
        for m in model.modules():
            if m is model:
                continue
            label = f"{names[id(m)]} ({type(m).__name__})"
            handles.append(m.register_forward_pre_hook(lambda mod, a, label=label: flow.enter(label)))
            handles.append(m.register_forward_hook(lambda mod, a, o: flow.leave()))
        with torch.no_grad(), flow:
            model(x)
    return flow


def token_layout(shape: tuple[int, ...], dims: int) -> str | None:
    """How a layer's ``(batch, tokens, features)`` output lays out a grid of ``dims`` axes:
    ``"tokens"`` (the tokens form a square/cube grid, as Swin's), ``"vit"`` (a class token first,
    then the grid, as torchvision's and timm's ViTs), or None (not tokens, or no grid)."""
    if len(shape) != 3:
        return None
    for layout, patches in (("tokens", shape[1]), ("vit", shape[1] - 1)):
        side = round(patches ** (1 / dims)) if patches > 0 else 0
        if patches > 0 and side ** dims == patches:
            return layout
    return None


class TokenGrid(nn.Module):
    """The identity on ``(batch, features, *grid)`` maps: the layer a CAM method looks at in place
    of a token layer, whose tokens pass through it as a grid (:func:`token_grid`)."""

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return maps


@contextlib.contextmanager
def token_grid(call):
    """Within the block: ``call`` itself, or, where its layer outputs tokens laid out on a grid
    (:func:`token_layout`), ``call`` with a :class:`TokenGrid` as its layer, through which the
    layer's patch tokens pass as ``(batch, features, *grid)`` maps and come back as the same
    tokens (values and gradients unchanged; a class token goes around it). A CAM method then
    weighs features over the grid, what ``reshape_transform: "vit"`` does in grad-cam, instead
    of taking tokens for channels. Logged."""
    if not isinstance(call.layer, nn.Module) or isinstance(call.layer, (nn.modules.conv._ConvNd,
                                                                         nn.modules.batchnorm._BatchNorm)):
        yield call  # no layer, several (a method that fuses them), or one that outputs maps: nothing to tell
        return
    output = call.layer_output()
    dims = call.inputs.ndim - 2
    layout = token_layout(tuple(output.shape), dims) if torch.is_tensor(output) else None
    if layout is None:
        yield call
        return
    probe = TokenGrid()

    def through_grid(module, inputs, tokens):
        first, patches = (tokens[:, :1], tokens[:, 1:]) if layout == "vit" else (None, tokens)
        b, n, d = patches.shape
        side = round(n ** (1 / dims))
        maps = probe(patches.transpose(1, 2).reshape(b, d, *([side] * dims)))
        back = maps.reshape(b, d, n).transpose(1, 2)
        return back if first is None else torch.cat([first, back], dim=1)

    log.info("the layer outputs tokens %s: explained on their %s grid (reshape_transform %r)", tuple(output.shape),
             "x".join([str(round((output.shape[1] - (layout == "vit")) ** (1 / dims)))] * dims), layout)
    with removing(call.layer.register_forward_hook(through_grid)):
        yield dataclasses.replace(call, layer=probe)


def attention(model: nn.Module, x: torch.Tensor | None = None) -> list[str]:
    """The model's attention modules: ``nn.MultiheadAttention`` by type, and, given an input ``x``,
    the modules of their own (MONAI's ``SABlock``, Swin's ``WindowAttention``, timm's ``Attention``)
    that multiply two input-dependent paths (:func:`products`) and apply a softmax (or fused
    attention) themselves or in a submodule; a sigmoid gate (squeeze-excitation, attention gates) is no such module:
    LRP's rules see neither their ``q·kᵀ`` product nor the softmax over it, and the
    relevance overflows there (UNETR, SwinUNETR at their usual depths)."""
    found = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if x is not None and not found:
        try:
            flow = _traced(model, x)
        except Exception as exc:  # noqa: BLE001 (not decided: refuse nothing)
            log.debug("attention products: %s: %s", type(exc).__name__, exc)
            return []
        found = _attending(flow)
    return found


def _attending(flow: _DataFlow) -> list[str]:
    """The labels of ``flow``'s products in modules that apply a softmax themselves or in a submodule."""
    def name(label: str) -> str:
        return label.rsplit(" (", 1)[0]

    softmax = {name(label) for label in flow.softmax}
    return [label for label in flow.found if any(s == name(label) or s.startswith(name(label) + ".") for s in softmax)]


#: Normalisations by statistics of their own input that :mod:`esegeta.attribution.rules` substitutes
#: (class names) while rule-based methods run: their standard deviation held constant.
NORMS = ("LayerNorm", "LayerNorm2d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")


def normalisation(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation by statistics of its own input that the substitutes
    cover (:data:`NORMS`; an InstanceNorm tracking running statistics uses those in eval mode: it is
    affine already, and needs none)."""
    if type(module).__name__ not in NORMS:
        return False
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return module.training or not module.track_running_stats or module.running_mean is None
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm))


#: Layers DeepLift's rules treat as linear although they are not: a normalisation by statistics of
#: its own input (instance, group, layer norm) and attention. Those the substitutes cover
#: (:func:`normalisation`, attention: :mod:`esegeta.attribution.rules`) have exact rules while
#: LRP and DeepLIFT run; the others are noted.
_NOT_LINEAR = ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "GroupNorm", "LayerNorm", "LocalResponseNorm",
               "MultiheadAttention")


#: The axioms (``MethodSpec.axiom``) that hold through rules for each layer, as they read in notes:
#: DeepLift's summation to delta and LRP's conservation pass the layers of :data:`_NOT_LINEAR` and
#: products of two data-dependent paths as linear maps or gradients, so hold only approximately there.
RULE_AXIOMS = {"summation-to-delta": "summation to delta", "conservation": "relevance conservation"}


def axiom_notes(spec, model: nn.Module, x: torch.Tensor | None = None) -> list[str]:
    """What keeps a method's axiom (``spec.axiom``, one of :data:`RULE_AXIOMS`) from holding exactly
    on this model (shown by ``check``, written to the manifest's records; the method runs): through
    the layers of :data:`_NOT_LINEAR` the substitutes do not cover (which the rules pass as linear
    maps) and, given an input ``x``, through products of two data-dependent paths other than
    attention (:func:`products`: gates)."""
    axiom = RULE_AXIOMS.get(spec.axiom)
    if axiom is None:
        return []
    notes = []
    found = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
             if any(isinstance(m, getattr(nn, t)) for t in _NOT_LINEAR) and not normalisation(m)
             and not isinstance(m, nn.MultiheadAttention)]
    if found:
        notes.append(f"{axiom} holds only approximately: {', '.join(found[:3])}{' ...' if len(found) > 3 else ''} "
                     "normalises by statistics of its own input, which the rules pass as a linear map")
    gates = []
    if x is not None:
        try:
            flow = _traced(model, x)  # one forward pass: the products, and which of them attend
            gates = [g for g in flow.found if g not in _attending(flow)]
        except Exception as exc:  # noqa: BLE001 (a note that cannot be decided is left out)
            log.debug("products of %s: %s: %s", spec.id, type(exc).__name__, exc)
    gates = [g for g in gates if not g.endswith("(MultiheadAttention)")]
    if gates:
        notes.append(f"{axiom} holds only approximately: {', '.join(gates[:3])}{' ...' if len(gates) > 3 else ''} "
                     "multiplies two paths that both depend on the input (a gate), which the rules pass as its "
                     "gradient")
    return notes
