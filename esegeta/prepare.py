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
  the names: the second name is made an alias (:func:`_resolve_aliases`), so it stays
  callable but is no child any more, and every walk sees the module once;
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

    def __init__(self, model: nn.Module, changes: list[str]):
        super().__init__()
        self.model = model
        self.changes = changes
        self._call_sites = [m for m in model.modules() if isinstance(m, CallSites)]

    def forward(self, *args, **kwargs):
        for module in self._call_sites:
            module.next_site = 0
        return self.model(*args, **kwargs)

    def layer(self, name: str) -> nn.Module:
        """The submodule ``name`` (named as in the user's model)."""
        return self.model.get_submodule(name)


def _count_calls(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(
                lambda m, i, o, name=name: counts.__setitem__(name, counts.get(name, 0) + 1)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
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


#: Containers whose children are reached by position (an alias there is replaced, not removed).
_ORDERED = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class Alias(nn.Module):
    """A second name of a module, inside a ``Sequential``/``ModuleList``: calls it, without
    registering it (so every walk of the model sees the module once, under its first name)."""

    def __init__(self, target: nn.Module, name: str):
        super().__init__()
        self.__dict__["target"] = target
        self.alias_of = name

    def forward(self, *args, **kwargs):
        return self.target(*args, **kwargs)


def _resolve_aliases(work: nn.Module, changes: list[str]) -> list[tuple[nn.Module, str]]:
    """Every module registered under two names keeps its first (``named_modules`` order); a later
    name stops being a child: an attribute (or, in an ordered container, an :class:`Alias`;
    a parameter-free module there becomes a copy of its own). Returns the (parent, key) of every
    alias, to keep them pointing at the module if it is replaced later."""
    first = {id(m): n for n, m in work.named_modules(remove_duplicate=True)}
    seen: set[int] = set()
    aliases: list[tuple[nn.Module, str]] = []
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
            if isinstance(parent, _ORDERED):
                if not any(True for _ in child.parameters()) and not any(True for _ in child.buffers()):
                    parent._modules[key] = copy.deepcopy(child)
                    changes.append(f"{name}: the parameter-free {type(child).__name__} also registered as "
                                   f"{first[id(child)]}, made a module of its own")
                    continue
                parent._modules[key] = Alias(child, first[id(child)])
            else:
                del parent._modules[key]
                parent.__dict__[key] = child
                aliases.append((parent, key))
            changes.append(f"{name}: alias of {first[id(child)]} ({type(child).__name__}), no longer a child: "
                           "hooks attach to it once")
    return aliases


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
    aliases = _resolve_aliases(work, changes)
    for name, n in _count_calls(work, example[:1]).items():
        if n < 2:
            continue
        module = work.get_submodule(name)
        if any(True for _ in module.parameters()) or list(module.children()):
            log.warning("module %s is called %d times per forward and has parameters or children: "
                        "left shared; DeepLift/LRP may misbehave on it", name, n)
            continue
        sites = CallSites(module, n)
        _set_submodule(work, name, sites)
        for parent, key in aliases:
            if parent.__dict__.get(key) is module:
                parent.__dict__[key] = sites
        for alias in (m for m in work.modules() if isinstance(m, Alias) and m.target is module):
            alias.__dict__["target"] = sites
        changes.append(f"{name}: {type(module).__name__} reused at {n} call sites, split into {n} modules")
    return PreparedModel(work, changes)


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


class _OutOfPlace(torch.overrides.TorchFunctionMode):
    """Augmented assignments on tensors (``out += identity``) and functional activations called with
    ``inplace=True`` are computed out of place: the caller binds the result, so nothing else changes.
    (A bare ``x.add_(y)`` whose result is dropped relies on the side effect: left alone.)"""

    def __init__(self):
        super().__init__()
        self.rewritten = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _AUGMENTED and len(args) == 2 and not kwargs and _augmented_assignment(sys._getframe(1)):
            self.rewritten += 1
            return _AUGMENTED[name](*args)
        if kwargs.get("inplace") is True:
            self.rewritten += 1
            kwargs = {**kwargs, "inplace": False}
        return func(*args, **kwargs)


#: Methods that hook module backward passes, and so fail on a view modified in place.
_HOOKING = ("DeepLift", "LRP", "GuidedBackprop", "Deconvolution", "GuidedGradCam")


def needs_out_of_place(spec: Any) -> bool:
    """Whether ``spec``'s method hooks module backward passes (see :func:`out_of_place`)."""
    library = spec.library.name
    return (library in ("shap", "zennit", "torchray") or (library == "captum" and any(k in spec.name for k in _HOOKING))
            or spec.id in ("esegeta.GuidedBackprop", "esegeta.LayerActivationGuidedBackprop"))


@contextlib.contextmanager
def out_of_place(spec: Any) -> Iterator[None]:
    """While ``spec``'s method runs: in-place tensor operations computed out of place, if it needs that."""
    if not needs_out_of_place(spec):
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
