"""The method registry: one :class:`MethodSpec` per method id ``<library>.<UpstreamName>``.

Adapter modules (``esegeta.adapters.*``) register their methods from tables when first
needed; they import neither torch nor their explainer library at module level, so
listing the registry is fast and a missing extra only makes its own methods unavailable.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ConfigError, MethodUnavailable, did_you_mean

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Adapter modules, imported on first registry access. A new library is one line here.
ADAPTER_MODULES = tuple(f"esegeta.adapters.{name}" for name in (
    "captum", "torchray", "gradcam", "zennit", "shap", "lime", "lucent", "own"))

#: Where each kind of method puts its result.
KINDS = {
    "attribution": "input-resolution attribution",
    "layer": "attribution (or activation) at a layer's resolution",
    "neuron": "input attribution of one neuron of a layer",
    "image": "an image of its own (feature visualisation), not aligned with the input",
}

#: The kinds of model a method applies to: a classifier, or a segmenter behind a wrapper.
TASKS = ("classification", "segmentation")


@dataclass
class Call:  # noqa: D101 (annotations are strings: torch is not imported here)
    """Everything an adapter needs for one attribution call.

    ``forward`` maps inputs to ``(B, K)`` scores (the wrapped model when a wrapper is set);
    ``network`` is the prepared copy of the user's model (where ``layer`` lives).
    ``base_dir`` is the config's folder (relative paths in params resolve there);
    ``samples`` are the run's inputs as one batch (for methods that fit on data or draw
    a background from it), or None; an adapter may put extra named outputs in
    ``extras`` (e.g. the relevance of every layer), which the runner saves next to the result.
    """

    forward: nn.Module
    network: nn.Module
    inputs: torch.Tensor
    target: Any
    layer: nn.Module | None
    params: dict[str, Any]
    noise_tunnel: dict[str, Any] | None = None
    base_dir: Path | None = None
    samples: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def layer_output(self) -> torch.Tensor:
        """``layer``'s output on ``inputs`` (one forward of ``forward`` without gradients)."""
        import torch

        seen: list[torch.Tensor] = []
        handle = self.layer.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            with torch.no_grad():
                self.forward(self.inputs)
        finally:
            handle.remove()
        return seen[0]


class Adapter(Protocol):
    """Translates a method entry into one upstream call."""

    def parameters(self, spec: "MethodSpec") -> Mapping[str, inspect.Parameter]:
        """The parameter names a config may set, under their upstream names."""

    def check_value(self, name: str, value: Any, path: str) -> None:
        """Raise ConfigError for a JSON value that cannot work (checked before anything runs)."""

    def noise_tunnel_parameters(self) -> Mapping[str, inspect.Parameter] | None:
        """The names a ``noise_tunnel`` block may set, or None if unsupported."""

    def run(self, spec: "MethodSpec", call: Call) -> torch.Tensor:
        """Run the method and return the upstream result (batch dimension kept)."""


@dataclass(frozen=True, eq=False)
class MethodSpec:
    """One registered method. ``defaults`` fill upstream parameters that have no upstream
    default (e.g. Occlusion's window) from the input; ``quick_params`` bound the runtime
    of the conformance tests and the demo; ``leaf_layer`` methods need a layer without
    submodules; ``tasks`` are the kinds of model it applies to (see :data:`TASKS`);
    ``exclusive`` methods change torch for the whole process while they run (TorchRay patches
    ``torch.relu`` and friends), so no other job may run beside them."""

    library: str
    name: str
    kind: str
    adapter: Adapter
    requires: tuple[str, ...]
    extra: str
    needs_layer: bool = False
    leaf_layer: bool = False
    dims: tuple[int, ...] = (2, 3)
    tasks: tuple[str, ...] = TASKS
    needs_target: bool = True
    defaults: Mapping[str, Callable[[torch.Tensor], Any]] = field(default_factory=dict)
    quick_params: Mapping[str, Any] = field(default_factory=dict)
    reference: str = ""
    exclusive: bool = False

    @property
    def id(self) -> str:
        return f"{self.library}.{self.name}"

    def unavailable_reason(self) -> str | None:
        """None if the method's libraries are importable, else what to install."""
        missing = [m for m in self.requires if not _importable(m)]
        if missing:
            return f"{', '.join(missing)} is not installed: pip install 'esegeta[{self.extra}]'"
        return None

    def check_available(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise MethodUnavailable(f"{self.id} is unavailable: {reason}")

    def amp_safety(self, precision: str) -> tuple[bool, str]:
        """(safe, why) in the reduced ``precision`` (``bf16``/``fp16``), from the measured table
        (:func:`amp_safety_table`); a method the table does not list is not shown safe."""
        row = self.amp_measurement(precision)
        if row is None:
            return False, f"not measured in {precision} (benchmarks/precision.py)"
        return bool(row["safe"]), row["reason"]

    def amp_measurement(self, precision: str) -> dict[str, Any] | None:
        """The measured row for ``precision``: safe, reason, min_r, axiom errors, per sample."""
        return amp_safety_table()["methods"].get(self.id, {}).get(precision)

    def row(self) -> dict[str, Any]:
        """The registry entry as `esegeta methods --json` shows it."""
        reason = self.unavailable_reason()
        return {
            "id": self.id,
            "library": self.library,
            "kind": self.kind,
            "needs_layer": self.needs_layer,
            "dims": list(self.dims),
            "tasks": list(self.tasks),
            "available": reason is None,
            "reason": reason,
            "defaults": sorted(self.defaults),
            "reference": self.reference,
            "amp": {precision: {k: v for k, v in (self.amp_measurement(precision) or {"safe": False}).items()
                                if k != "samples"} | {"reason": self.amp_safety(precision)[1]}
                    for precision in ("bf16", "fp16")},
        }


#: Which methods keep their results in reduced precision, measured by ``benchmarks/precision.py``.
AMP_SAFETY = Path(__file__).with_name("amp_safety.json")


@cache
def amp_safety_table() -> dict[str, Any]:
    """The measured table: ``{"min_r", "note", "methods": {id: {precision: {"safe", "reason", ...}}}}``."""
    try:
        return json.loads(AMP_SAFETY.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"methods": {}}


def keyword_parameters(fn: Callable, exclude: frozenset[str] | set[str] = frozenset()) -> dict[str, inspect.Parameter]:
    """``fn``'s named parameters but those in ``exclude`` (no ``*args``/``**kwargs``): what a
    JSON config may set for an upstream callable, under the upstream names."""
    return {name: p for name, p in inspect.signature(fn).parameters.items()
            if name not in exclude and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


_found: set[str] = set()


def _importable(module: str) -> bool:
    """Whether ``module`` can be imported (found once, remembered: this runs on every call)."""
    if module not in _found and importlib.util.find_spec(module) is not None:
        _found.add(module)
    return module in _found


_REGISTRY: dict[str, MethodSpec] = {}
_loaded = False


def register(spec: MethodSpec) -> MethodSpec:
    if spec.id in _REGISTRY:
        raise ValueError(f"method {spec.id} registered twice")
    if spec.kind not in KINDS:
        raise ValueError(f"{spec.id}: unknown kind {spec.kind!r}")
    _REGISTRY[spec.id] = spec
    return spec


def all_methods() -> Mapping[str, MethodSpec]:
    """Every registered method, by id (adapter modules are imported on first call)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in ADAPTER_MODULES:
            importlib.import_module(module)
    return MappingProxyType(_REGISTRY)


def get(method_id: str, path: str = "id") -> MethodSpec:
    """The spec for ``method_id``, or a :class:`ConfigError` with the closest valid id."""
    registry = all_methods()
    if method_id in registry:
        return registry[method_id]
    raise ConfigError(path, f"unknown method {method_id!r}" + did_you_mean(method_id, registry))
