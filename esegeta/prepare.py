"""Model preparation: methods run on a prepared copy, never on the user's model.

The copy is in eval mode (parameters as the user set them) and fixed for what explainers trip on:

- a parameter-free module (typically ``self.relu``) called at several places in one
  forward, as torchvision's ``BasicBlock`` does, breaks DeepLift, LRP and SHAP's
  DeepExplainer, which keep per-module state: it is split into one copy per call site
  (:class:`CallSites`), so every hook sees one call;
- in-place activations (``ReLU(inplace=True)``) break backward hooks: made non-inplace.

The user's model object, parameters, mode and hooks are left exactly as they were.
"""
from __future__ import annotations

import copy
import logging
import weakref
from dataclasses import dataclass, field

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


def prepare(model: nn.Module, example: torch.Tensor) -> PreparedModel:
    """A prepared copy of ``model`` on ``example``'s device (see the module docstring)."""
    work = copy.deepcopy(model).to(example.device).eval()
    changes: list[str] = []
    if isinstance(work, torch.jit.ScriptModule):
        # Compiled graphs take no module hooks or swaps: used as they are.
        return PreparedModel(work, ["TorchScript model used as is (hook-based methods may not apply)"])
    for name, module in work.named_modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
            changes.append(f"{name}: in-place {type(module).__name__} made non-inplace")
    for name, n in _count_calls(work, example[:1]).items():
        if n < 2:
            continue
        module = work.get_submodule(name)
        if any(True for _ in module.parameters()) or list(module.children()):
            log.warning("module %s is called %d times per forward and has parameters or children: "
                        "left shared; DeepLift/LRP may misbehave on it", name, n)
            continue
        _set_submodule(work, name, CallSites(module, n))
        changes.append(f"{name}: {type(module).__name__} reused at {n} call sites, split into {n} modules")
    return PreparedModel(work, changes)


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
