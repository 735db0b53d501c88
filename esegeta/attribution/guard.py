"""One guard for every change a library makes to the prepared copy: :func:`restored`.

Methods run on a prepared copy that is reused from call to call, and libraries leave things
on it: hooks they forget (SHAP, Lucent) or do not remove when a call fails half-way
(pytorch-grad-cam, TorchRay), modules swapped in (AblationCAM), parameters set to
``requires_grad=False`` (TorchRay), gradients, canonized weights (Zennit), attributes stored
on modules (SHAP's ``x``/``y``, Captum's LRP ``rule``). ``restored`` takes a snapshot on entry
and puts back, on exit and on error, whatever differs, generically rather than per library:

- every module's instance attributes: added ones are deleted, replaced ones put back; every
  dict or set torch keeps there (``_parameters``, ``_buffers``, ``_modules`` and all hook dicts,
  ``_forward_hooks_with_kwargs``, ``_forward_hooks_always_called``, ``_backward_pre_hooks``,
  state-dict hooks...) gets its entries back in place (handles keep referring to it);
- every parameter and buffer: its data (when replaced, as canonizers do), ``requires_grad``,
  ``grad`` and its tensor hooks;
- torch's global module hooks (``torch.nn.modules.module._global_*``): hooks added meanwhile
  are removed. They are process-wide: no adapted library sets one; a method that did would
  have to be ``exclusive`` (run alone), or a job beside it would lose its own.

In-place changes of a tensor's values cannot be undone without copying every weight on every
call; no adapted library makes them (canonizers assign ``.data``, which is undone).
"""
from __future__ import annotations

import dataclasses
import logging
import operator
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from esegeta.attribution.prepare import out_of_place
from esegeta.attribution.rules import for_method as substitutes_for
from esegeta.spec.params import with_defaults
from esegeta.spec.registry import Call, MethodSpec

log = logging.getLogger("esegeta")

#: Hook dicts a tensor keeps (leaf tensors: parameters and buffers).
TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")
_MISSING = object()
#: The containers torch keeps on a module (hook dicts are OrderedDicts; some state is a set).
_CONTAINERS = frozenset({dict, OrderedDict, set})


def _walk(models: tuple[nn.Module, ...]) -> list[nn.Module]:
    """Every module under ``models``, each once (a plain walk: ``modules()`` costs several times more)."""
    seen: dict[int, nn.Module] = {}
    stack = list(models)
    while stack:
        module = stack.pop()
        if id(module) not in seen:
            seen[id(module)] = module
            stack.extend(module._modules.values())
    return list(seen.values())


def _same(now: Any, before: Any) -> bool:
    """Whether a dict or set has the entries it had (dict values compared by identity, in order)."""
    if len(now) != len(before):
        return False
    if not before or isinstance(before, set):
        return now == before
    return list(now) == list(before) and all(map(operator.is_, now.values(), before.values()))


def _module_state(module: nn.Module) -> tuple:
    """The module's attributes, and a copy of each container among them (most are empty hook
    dicts: recorded as empty without a copy, which keeps the guard cheap on every call)."""
    attrs = vars(module)
    contents = [(key, value, value.copy() if value else None) for key, value in attrs.items()
                if value.__class__ in _CONTAINERS]
    return module, attrs.copy(), contents


def _tensor_state(tensor) -> tuple:
    backward, accumulate = (getattr(tensor, name, None) for name in TENSOR_HOOKS)
    hooks = (None if backward is None else dict(backward), None if accumulate is None else dict(accumulate))
    return tensor, tensor.data, tensor.data_ptr(), tensor.requires_grad, tensor.grad, hooks


def _restore_module(state: tuple, fixed: list[str]) -> None:
    module, attrs, contents = state
    now = vars(module)
    if len(now) != len(attrs) or not all(map(operator.is_, now.values(), attrs.values())) or now.keys() != attrs.keys():
        for key in [k for k in now if k not in attrs]:
            del now[key]
            fixed.append(f"{type(module).__name__}.{key} added")
        for key, value in attrs.items():
            if now.get(key, _MISSING) is not value:
                now[key] = value
                fixed.append(f"{type(module).__name__}.{key} replaced")
    for key, current, before in contents:
        if before is None:
            if current:
                current.clear()
                fixed.append(f"{type(module).__name__}.{key}")
        elif not _same(current, before):
            current.clear()
            current.update(before)
            fixed.append(f"{type(module).__name__}.{key}")


def _restore_tensor(state: tuple, fixed: list[str]) -> None:
    tensor, data, pointer, requires_grad, grad, hooks = state
    if tensor.data_ptr() != pointer or tensor.shape != data.shape or tensor.dtype != data.dtype:
        tensor.data = data
        fixed.append("tensor data")
    if tensor.requires_grad != requires_grad:
        tensor.requires_grad_(requires_grad)
        fixed.append("requires_grad")
    if tensor.grad is not grad:
        tensor.grad = grad
    for name, before in zip(TENSOR_HOOKS, hooks):
        current = getattr(tensor, name, None)
        if current:
            for key in [k for k in current if before is None or k not in before]:
                del current[key]
                fixed.append(f"tensor {name}")


def _global_hooks() -> dict[str, Any]:
    return {name: value.copy() for name, value in vars(_torch_module).items()
            if name.startswith("_global_") and isinstance(value, dict)}


def _restore_globals(before: dict[str, Any], fixed: list[str]) -> None:
    for name, kept in before.items():
        current = getattr(_torch_module, name)
        for key in [k for k in current if k not in kept]:
            del current[key]
            fixed.append(f"torch {name}")


@contextmanager
def restored(*models: nn.Module) -> Iterator[None]:
    """Undo, on exit and on error, every change made to ``models`` meanwhile (see the module docstring)."""
    modules = _walk(models)
    states = [_module_state(m) for m in modules]
    tensors = [_tensor_state(t) for m in modules for d in (m._parameters, m._buffers)
               for t in d.values() if t is not None]
    full_backward = _torch_module._global_is_full_backward_hook
    globals_before = _global_hooks()
    try:
        yield
    finally:
        fixed: list[str] = []
        for state in states:
            _restore_module(state, fixed)
        for state in tensors:
            _restore_tensor(state, fixed)
        _restore_globals(globals_before, fixed)
        _torch_module._global_is_full_backward_hook = full_backward
        if fixed:
            log.debug("restored on the prepared copy: %s", ", ".join(sorted(set(fixed))))


def run_guarded(spec: MethodSpec, call: Call) -> torch.Tensor:
    """The one way an adapter runs: the spec's defaults filled in (:func:`esegeta.spec.params.with_defaults`,
    the one place), in-place operations of the model's code computed out of place where needed, and
    every change the library makes to the call's models undone afterwards, also on error
    (:func:`restored`); rule-based methods (LRP, DeepLIFT) run on the LRP-conservative substitutes
    (:mod:`esegeta.attribution.rules`). So adapters neither fill defaults nor restore anything themselves."""
    call = dataclasses.replace(call, params=with_defaults(spec, call.params, call.inputs))
    # the substitutes' torch function mode below out_of_place's: that one reads the model's own frames
    with restored(call.forward, call.network), substitutes_for(spec, call.network, call.inputs, call.params,
                                                             call.forward), \
            out_of_place(spec, call.network):
        return spec.adapter.run(spec, call)
