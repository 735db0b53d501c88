"""Model preparation: methods run on a prepared copy, never on the user's model.

The copy is in eval mode (parameters as the user set them) and fixed for what explainers trip on:

- a parameter-free module (typically ``self.relu``) called at several places in one
  forward, as torchvision's ``BasicBlock`` does, breaks DeepLift, LRP and SHAP's
  DeepExplainer, which keep per-module state: it is split into one copy per call site
  (:class:`CallSites`), so every hook sees one call;
- in-place activations (``ReLU(inplace=True)``) break backward hooks: made non-inplace;
- a module registered under two names (MONAI's DynUNet keeps every block again under
  ``skip_layers``; SegResNet puts ``act_mod`` into several ``Sequential``s) is walked twice by
  ``Module.apply``, so Captum's DeepLift hooks it twice, and AblationCAM swaps only one of
  the names: the second name becomes an :class:`Alias` that calls whatever the first name
  holds at call time, so every walk sees the module once and a swap reaches both;
- tensors a past forward left in attributes (DynUNet's deep-supervision heads after a
  training step) are part of an autograd graph, which ``deepcopy`` refuses: the copy holds
  them detached (:func:`_copy`).

In-place tensor operations inside the model's code (``out += identity`` in torchvision's
residual blocks, ``F.relu(x, inplace=True)`` in DenseNet) break methods that hook module
backward passes (a hooked module's output is a view that must not be modified in place):
:func:`out_of_place` computes them out of place while such a method runs (a torch function
mode: nothing on the copy changes).

Every change is logged (``PreparedModel.changes``). The user's model object, parameters,
mode and hooks are left exactly as they were.
"""
from __future__ import annotations

import contextlib
import copy
import dis
import sys
import logging
import weakref
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from esegeta.hooks import removing

log = logging.getLogger("esegeta")


class CallSites(nn.Module):
    """A parameter-free module used at ``n`` call sites, split into ``n`` copies.

    The k-th call within one forward of the prepared model goes to ``sites[k]``; the
    counter is reset by :class:`PreparedModel` at the start of every forward.
    """

    def __init__(self, module: nn.Module, n_sites: int):
        super().__init__()
        self.sites = nn.ModuleList(copy.deepcopy(module) for _ in range(n_sites))
        self.next_site = 0

    def forward(self, *args, **kwargs):
        site = self.sites[self.next_site % len(self.sites)]
        self.next_site += 1
        return site(*args, **kwargs)


class PreparedModel(nn.Module):
    """The explainers' view of the user's model: ``self.model`` is the fixed copy."""

    def __init__(self, model: nn.Module, changes: list[str], inplace_ops: bool = True):
        super().__init__()
        self.model = model
        self.changes = changes
        #: whether the model's own code ran an in-place tensor operation on the example (what
        #: :func:`out_of_place` rewrites); True where unknown
        self.inplace_ops = inplace_ops
        self._call_sites = [m for m in model.modules() if isinstance(m, CallSites)]

    def summary(self, listed: int = 3) -> list[str]:
        """:attr:`changes` for people: each one where there are at most ``listed``, else one line per
        kind of change with its count (the full list stays in ``changes`` and the manifest)."""
        if len(self.changes) <= listed:
            return list(self.changes)
        kinds: dict[str, int] = {}
        for change in self.changes:
            kind = change.split(": ", 1)[-1]
            kinds[kind] = kinds.get(kind, 0) + 1
        return [f"{n}× {kind}" if n > 1 else kind for kind, n in kinds.items()]

    def forward(self, *args, **kwargs):
        for module in self._call_sites:
            module.next_site = 0
        return self.model(*args, **kwargs)

    def layer(self, name: str) -> nn.Module:
        """The submodule ``name`` (named as in the user's model)."""
        return self.model.get_submodule(name)


def _count_calls(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    counts: dict[str, int] = {}
    with removing() as handles:
        handles.extend(module.register_forward_hook(
            lambda m, i, o, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
            for name, module in model.named_modules() if name)
        with torch.no_grad():
            model(example)
    return counts


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _copy(model: nn.Module, changes: list[str]) -> nn.Module:
    """``deepcopy(model)``, with tensors of an autograd graph held in module attributes (directly
    or in a list, tuple or dict) copied detached: ``deepcopy`` refuses non-leaf tensors."""
    memo: dict[int, Any] = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key.startswith("_"):
                continue
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
            for item in items:
                if torch.is_tensor(item) and item.grad_fn is not None and id(item) not in memo:
                    memo[id(item)] = item.detach().clone()
                    changes.append(f"{name or type(model).__name__}.{key}: a tensor of a past forward's autograd graph, "
                                   "copied detached")
    return copy.deepcopy(model, memo)


class Alias(nn.Module):
    """A second name of a module: calls whatever the model holds under the first name now (so a
    library that swaps the module, as AblationCAM does, swaps it for both), without registering
    it (so every walk of the model, and every hook, sees the module once, under its first name)."""

    def __init__(self, root: nn.Module, name: str):
        super().__init__()
        self.__dict__["root"] = root  # not a child: deep copies follow it to the copied root
        self.alias_of = name

    def forward(self, *args, **kwargs):
        return self.root.get_submodule(self.alias_of)(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"alias of {self.alias_of}"


def _resolve_aliases(work: nn.Module, changes: list[str]) -> None:
    """Every module registered under two names keeps its first (``named_modules`` order); a later
    name becomes an :class:`Alias` of it (a parameter-free module becomes a copy of its own instead:
    the same function, with its own hooks)."""
    first = {id(m): n for n, m in work.named_modules(remove_duplicate=True)}
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", work)]
    while stack:
        prefix, parent = stack.pop(0)
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        for key, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{prefix}.{key}" if prefix else key
            if first.get(id(child)) == name or id(child) not in first:
                stack.append((name, child))
                continue
            if not any(True for _ in child.parameters()) and not any(True for _ in child.buffers()):
                parent._modules[key] = copy.deepcopy(child)
                changes.append(f"{name}: the parameter-free {type(child).__name__} also registered as "
                               f"{first[id(child)]}, made a module of its own")
                continue
            parent._modules[key] = Alias(work, first[id(child)])
            changes.append(f"{name}: alias of {first[id(child)]} ({type(child).__name__}): hooks attach to it once")


def prepare(model: nn.Module, example: torch.Tensor) -> PreparedModel:
    """A prepared copy of ``model`` on ``example``'s device (see the module docstring)."""
    changes: list[str] = []
    work = _copy(model, changes).to(example.device).eval()
    if isinstance(work, torch.jit.ScriptModule):
        # Compiled graphs take no module hooks or swaps: used as they are.
        return PreparedModel(work, ["TorchScript model used as is (hook-based methods may not apply)"])
    for name, module in work.named_modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
            changes.append(f"{name}: in-place {type(module).__name__} made non-inplace")
    _resolve_aliases(work, changes)
    seen = _OutOfPlace(detect_only=True)
    with seen:
        counts = _count_calls(work, example[:1])
    for name, n in counts.items():
        if n < 2:
            continue
        module = work.get_submodule(name)
        if isinstance(module, Alias):  # its calls are counted on the module it names
            continue
        if any(True for _ in module.parameters()) or list(module.children()):
            log.warning("module %s is called %d times per forward and has parameters or children: "
                        "left shared; DeepLift/LRP may misbehave on it", name, n)
            continue
        _set_submodule(work, name, CallSites(module, n))
        changes.append(f"{name}: {type(module).__name__} reused at {n} call sites, split into {n} modules")
    return PreparedModel(work, changes, inplace_ops=seen.rewritten > 0)


#: In-place tensor methods Python calls for ``a += b`` (``a -= b``...), and their out-of-place forms.
_AUGMENTED = {"add_": torch.add, "sub_": torch.sub, "mul_": torch.mul, "div_": torch.div}
#: ``BINARY_OP``'s arguments for the augmented assignments (``+=``, ``*=``, ``-=``, ``/=``).
_INPLACE_BINARY_OPS = frozenset({13, 18, 23, 24})


def _augmented_assignment(frame) -> bool:
    """Whether ``frame`` is executing ``a += b`` (or ``-=``, ``*=``, ``/=``): Python binds the result
    to ``a`` then, so computing it out of place changes nothing else (``a.add_(b)`` as a statement
    relies on the side effect, and is a call instead)."""
    code = frame.f_code.co_code
    i = frame.f_lasti
    return 0 <= i < len(code) - 1 and code[i] == dis.opmap.get("BINARY_OP", -1) and code[i + 1] in _INPLACE_BINARY_OPS


#: Packages whose own code is never rewritten: the explainers (their accumulators may be views
#: written through on purpose) and torch itself.
_LIBRARY_CODE = ("captum", "shap", "zennit", "pytorch_grad_cam", "torchray", "lime", "lucent", "esegeta", "torch")


def _packages(frame) -> list[str]:
    return frame.f_code.co_filename.replace("\\", "/").split("/")


def _caller(frame):
    """The first frame from ``frame`` up that is not torch's own (``F.relu`` reaches the mode
    through ``torch/nn/functional.py`` and ``torch/overrides.py``)."""
    while frame is not None and "torch" in _packages(frame):
        frame = frame.f_back
    return frame


def _model_code(frame) -> bool:
    """Whether ``frame`` runs model code (the user's, torchvision's, MONAI's...), not an explainer's or torch's."""
    return frame is not None and not any(package in _packages(frame) for package in _LIBRARY_CODE)


def _in_graph(args: tuple) -> bool:
    """Whether an in-place operation on ``args`` would be recorded by autograd (what hooks trip on)."""
    return torch.is_grad_enabled() and any(torch.is_tensor(a) and a.requires_grad for a in args)


class _OutOfPlace(torch.overrides.TorchFunctionMode):
    """In model code, while autograd records: augmented assignments on tensors (``out += identity``)
    and functional activations called with ``inplace=True`` are computed out of place; the caller
    binds the result, so nothing else changes. Left alone: a bare ``x.add_(y)`` (it relies on its
    side effect), the explainers' and torch's own code, and anything outside autograd."""

    def __init__(self, detect_only: bool = False):
        super().__init__()
        self.rewritten = 0
        #: count what would be rewritten, whether or not autograd records, and change nothing
        #: (the prepared copy's one forward: a model without such operations runs without the mode)
        self.detect_only = detect_only

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _AUGMENTED and len(args) == 2 and not kwargs and (self.detect_only or _in_graph(args)):
            frame = _caller(sys._getframe(1))
            if _model_code(frame) and _augmented_assignment(frame):
                self.rewritten += 1
                return func(*args) if self.detect_only else _AUGMENTED[name](*args)
        if (kwargs.get("inplace") is True and (self.detect_only or _in_graph(args))
                and _model_code(_caller(sys._getframe(1)))):
            self.rewritten += 1
            kwargs = kwargs if self.detect_only else {**kwargs, "inplace": False}
        return func(*args, **kwargs)


def needs_out_of_place(spec: Any) -> bool:
    """Whether ``spec``'s method needs in-place operations computed out of place (see :func:`out_of_place`):
    those that hook module backward passes, and those that replace a layer's output by a leaf
    tensor requiring gradients (Captum's layer methods, TorchRay's), on which the model's next
    in-place operation (DenseNet's ``F.relu(features, inplace=True)``) fails. Every method, then:
    the mode only changes how the same values are stored."""
    return spec is not None


@contextlib.contextmanager
def out_of_place(spec: Any, network: nn.Module | None = None) -> Iterator[None]:
    """While ``spec``'s method runs on ``network`` (the prepared copy): in-place tensor operations
    computed out of place, if it needs that and the model has any (a torch function mode costs
    on every operation, so a model whose forward ran none on the example runs without it)."""
    if not needs_out_of_place(spec) or not getattr(network, "inplace_ops", True):
        yield
        return
    mode = _OutOfPlace()
    with mode:
        yield
    if mode.rewritten:
        log.debug("%s: %d in-place tensor operation(s) computed out of place", spec.id, mode.rewritten)


@dataclass
class _CacheEntry:
    fingerprint: tuple
    prepared: PreparedModel = field(repr=False)


_cache: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module, device: torch.device) -> tuple:
    """Changes when the model's weights, buffers, structure or mode change (cheap: it runs per call)."""
    parts: list = [str(device), model.training]
    stack = [model]
    while stack:  # a plain walk over the module tree: parameters()/buffers() cost 10x more
        module = stack.pop()
        parts.append(id(module))
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None:
                parts.append((id(t), t.data_ptr(), t._version))
        stack.extend(module._modules.values())
    return tuple(parts)


def prepared(model: nn.Module, example: torch.Tensor) -> PreparedModel:
    """:func:`prepare`, cached per model and device until the model's weights change.

    Not per precision: the copy holds structure only (module call counts from one forward
    pass), no value computed from data, so an autocast attempt and its fp32 retry share it;
    casting the model (``.half()``) replaces its tensors and so changes the fingerprint."""
    if isinstance(model, PreparedModel):
        return model
    per_model = _cache.setdefault(model, {})
    key = str(example.device)
    fingerprint = _fingerprint(model, example.device)
    entry = per_model.get(key)
    if entry is None or entry.fingerprint != fingerprint:
        entry = _CacheEntry(fingerprint, prepare(model, example))
        per_model[key] = entry
        for change in entry.prepared.changes:
            log.debug("prepared copy: %s", change)
    return entry.prepared
