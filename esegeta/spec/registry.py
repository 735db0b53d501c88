"""The method registry: one :class:`MethodSpec` per method id ``<library>.<UpstreamName>``.

Every module of :mod:`esegeta.adapters` is found here (:func:`libraries`: no list to edit) and
imported when first needed; it states its :class:`Library` (``LIBRARY``: distribution, pip
extra, RNG use, use of the run's samples, batch and step parameters) and registers its
methods from tables. Adapter modules import neither torch nor their explainer library at
module level, so listing the registry is fast and a missing extra only makes its own methods
unavailable. A new library is one adapter module plus its extra in ``pyproject.toml``.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from esegeta.errors import ConfigError, MethodUnavailable, did_you_mean
from esegeta.hooks import removing
from esegeta.spec import signatures

if TYPE_CHECKING:
    import torch
    from torch import nn

    from esegeta.spec.cost import Passes

#: Where each kind of method puts its result.
KINDS = {
    "attribution": "input-resolution attribution",
    "layer": "attribution (or activation) at a layer's resolution",
    "neuron": "input attribution of one neuron of a layer",
    "image": "an image of its own (feature visualisation), not aligned with the input",
}

#: The kinds of model a method applies to: a classifier, or a segmenter behind a wrapper.
TASKS = ("classification", "segmentation")

#: How a method expands a batch of ``B`` inputs into the rows its forward passes see
#: (:mod:`esegeta.attribution.batching`): ``rows``, row ``r`` is input ``r``; ``tile``, ``k·B`` rows, row ``r``
#: is input ``r mod B``; ``per_input``, one upstream call per input (randomness, interleaved rows,
#: rules that amplify the batch's rounding, or not verified).
ROWS, TILE, PER_INPUT = "rows", "tile", "per_input"
BATCH_LAYOUTS = (ROWS, TILE, PER_INPUT)
#: The axiom a method keeps ("none": it keeps none). :func:`esegeta.attribution.architectures.axiom_notes`
#: says where a rule-based one (summation to delta, conservation) holds only approximately on a model.
AXIOMS = {
    "completeness": "attributions sum to F(x) - F(baseline) (up to the integral's discretisation)",
    "completeness-in-expectation": "attributions sum to F(x) - E F(baseline) in expectation over the samples",
    "summation-to-delta": "attributions sum to F(x) - F(baseline) (DeepLift's rules)",
    "conservation": "relevance is conserved from the output to the input, layer by layer (LRP's rules)",
    "efficiency": "Shapley values sum to F(x) - F(background)",
    "none": "no axiom",
}


@dataclass(frozen=True)
class Library:
    """What esegeta knows about one library: an adapter module's ``LIBRARY``.

    ``name`` is the method ids' prefix; ``distribution`` the installed package whose version the
    manifest records (None for esegeta's own methods); ``extra`` the pip extra that installs
    ``requires`` (import names). ``uses_global_rng``: its methods may draw from numpy's or
    Python's global RNG (then a job holds the global-RNG lock; False: torch's RNG only, which
    every job gets its own generator for); a method may say otherwise on its spec.
    ``reads_samples``: it may read the run's other inputs (``Call.samples``), so a result's
    resume key includes them. ``batch_params``: its internal batch parameters, halved on
    out-of-memory in this order, each with the count it batches when unset (None: unknown);
    ``step_params``: the parameters that set how many inputs one call evaluates."""
    name: str
    distribution: str | None
    extra: str
    requires: tuple[str, ...]
    uses_global_rng: bool = True
    reads_samples: bool = True
    batch_params: Mapping[str, str | None] = field(default_factory=dict)
    step_params: tuple[str, ...] = ()
    reference: str = ""
    #: Its registered methods (filled by :func:`register`).
    methods: list[MethodSpec] = field(default_factory=list, compare=False, hash=False, repr=False)


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
    layer: nn.Module | list[nn.Module] | None
    params: dict[str, Any]
    noise_tunnel: dict[str, Any] | None = None
    base_dir: Path | None = None
    samples: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def targets(self):
        """The target as a :class:`esegeta.spec.targets.Target` (one class per input), or None."""
        from esegeta.spec.targets import Target

        return Target.of(self.target, self.inputs.shape[0])

    def layer_output(self) -> torch.Tensor:
        """``layer``'s output on ``inputs`` (one forward of ``forward`` without gradients)."""
        import torch

        seen: list[torch.Tensor] = []
        with removing(self.layer.register_forward_hook(lambda m, i, o: seen.append(o))), torch.no_grad():
            self.forward(self.inputs)
        return seen[0]


class Adapter(Protocol):
    """Translates a method entry into one upstream call."""

    def parameters(self, spec: "MethodSpec") -> Mapping[str, inspect.Parameter]:
        """The parameter names a config may set, under their upstream names."""

    def check_value(self, name: str, value: Any, path: str) -> None:
        """Raise ConfigError for a JSON value that cannot work (checked before anything runs)."""

    def run(self, spec: "MethodSpec", call: Call) -> torch.Tensor:
        """Run the method and return the upstream result (batch dimension kept). Called only through
        :func:`esegeta.attribution.guard.run_guarded`, which fills the spec's defaults and undoes every
        change the library makes to the call's models."""


@dataclass(frozen=True, eq=False)
class MethodSpec:
    """One registered method of a :class:`Library` (a library's name is looked up).

    ``requires``/``extra`` default to the library's (a method may need more, e.g. OpenCV);
    ``defaults`` fill upstream parameters that have no upstream default (e.g. Occlusion's
    window) from the input (:func:`esegeta.spec.params.with_defaults`); ``quick_params`` bound the
    runtime of the conformance tests and the demo; ``leaf_layer`` methods need a layer without
    submodules; ``tasks`` are the kinds of model it applies to (see :data:`TASKS`).
    ``uses_global_rng`` overrides the library's (None: the library's); ``exclusive`` methods
    change torch for the whole process while they run (TorchRay patches ``torch.relu`` and
    friends), so no other job may run beside them; ``preflight(model, context)`` lists what in a
    prepared model the method cannot handle (Captum's LRP: leaf layers without a rule), each
    naming the layer and the fix, before a run (:mod:`esegeta.attribution.architectures`: the context holds
    the example input, layer and params; validate, check and explain refuse with them);
    ``noise_tunnel`` gives the parameters of a ``noise_tunnel`` block, None if it takes none;
    ``fuses_layers`` > 0: the method fuses the maps of several layers (the RefineCAMs): its entry's
    ``layer`` is a list of at least that many distinct names (one name where 1 suffices) and
    ``Call.layer`` the list of their modules.

    Every registered method states three facts in its adapter's table (:func:`register` refuses
    a method without them; the conformance suite checks them): ``passes(values, x, layer_shape)``,
    the model rows one call needs per input (a :class:`esegeta.spec.cost.Passes`, from the call's
    resolved parameter values; :func:`esegeta.spec.cost.expected_passes`); ``batch_layout``, one of
    :data:`BATCH_LAYOUTS` (how a batch of wrapped inputs is explained in one call); ``axiom``, one
    of :data:`AXIOMS`. ``trial(model, context)`` runs, for ``esegeta check`` only, what a library
    does to the model on a copy of it (zennit's canonizers) and returns ``(problems, notes)``: each
    problem a :class:`~esegeta.errors.ConfigError` whose path is relative to the method entry."""
    library: Library
    name: str
    kind: str
    adapter: Adapter
    requires: tuple[str, ...] = ()
    extra: str = ""
    needs_layer: bool = False
    leaf_layer: bool = False
    fuses_layers: int = 0
    dims: tuple[int, ...] = (2, 3)
    tasks: tuple[str, ...] = TASKS
    needs_target: bool = True
    defaults: Mapping[str, Callable[[torch.Tensor], Any]] = field(default_factory=dict)
    quick_params: Mapping[str, Any] = field(default_factory=dict)
    reference: str = ""
    exclusive: bool = False
    uses_global_rng: bool | None = None
    preflight: Callable[[nn.Module, Any], list[Any]] | None = None
    noise_tunnel: Callable[[], Mapping[str, inspect.Parameter]] | None = None
    passes: Callable[[Mapping[str, Any], torch.Tensor, Any], Passes] | None = None
    batch_layout: str | None = None
    axiom: str = ""
    trial: Callable[[nn.Module, Any], tuple[list[ConfigError], list[str]]] | None = None

    def __post_init__(self):
        library = self.library if isinstance(self.library, Library) else libraries()[self.library]
        object.__setattr__(self, "library", library)
        object.__setattr__(self, "requires", tuple(self.requires) or library.requires)
        object.__setattr__(self, "extra", self.extra or library.extra)
        if self.uses_global_rng is None:
            object.__setattr__(self, "uses_global_rng", library.uses_global_rng)

    @property
    def id(self) -> str:
        return f"{self.library.name}.{self.name}"

    def parameters(self) -> Mapping[str, inspect.Parameter]:
        """The parameters a config may set, under their upstream names (the adapter's answer,
        kept between processes by :mod:`esegeta.spec.signatures`: the library need not be imported)."""
        return signatures.parameters(self)

    def noise_tunnel_parameters(self) -> Mapping[str, inspect.Parameter] | None:
        """The names a ``noise_tunnel`` block may set, or None if the method takes none (cached as
        :meth:`parameters`)."""
        return signatures.noise_tunnel_parameters(self)

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
            "library": self.library.name,
            "kind": self.kind,
            "needs_layer": self.needs_layer,
            "fuses_layers": self.fuses_layers,
            "dims": list(self.dims),
            "tasks": list(self.tasks),
            "available": reason is None,
            "reason": reason,
            "defaults": sorted(self.defaults),
            "reference": self.reference,
            "axiom": self.axiom,
            "batch_layout": self.batch_layout,
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


def layer_names(layer: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The layer names an entry's ``layer`` gives: one name, a list of them (a method with
    ``fuses_layers``), or none."""
    if layer is None:
        return ()
    return (layer,) if isinstance(layer, str) else tuple(layer)


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
_LIBRARIES: dict[str, Library] = {}


def fact_problems(spec: MethodSpec) -> list[str]:
    """What of the facts every method states (``passes``, ``batch_layout``, ``axiom``) ``spec`` lacks."""
    found = []
    if not callable(spec.passes):
        found.append("passes: its cost formula, (values, x, layer_shape) -> Passes (esegeta.spec.cost)")
    if spec.batch_layout not in BATCH_LAYOUTS:
        found.append(f"batch_layout: one of {list(BATCH_LAYOUTS)}, not {spec.batch_layout!r}")
    if spec.axiom not in AXIOMS:
        found.append(f"axiom: one of {list(AXIOMS)}, not {spec.axiom!r}")
    return found


def register(spec: MethodSpec) -> MethodSpec:
    if spec.id in _REGISTRY:
        raise ValueError(f"method {spec.id} registered twice")
    if spec.kind not in KINDS:
        raise ValueError(f"{spec.id}: unknown kind {spec.kind!r}")
    missing = fact_problems(spec)
    if missing:
        raise ValueError(f"{spec.id}: state in its adapter's table ({type(spec.adapter).__module__}) "
                         + "; ".join(missing))
    _LIBRARIES.setdefault(spec.library.name, spec.library)
    spec.library.methods.append(spec)
    _REGISTRY[spec.id] = spec
    return spec


def _load() -> None:
    """Import every adapter module (found, not listed) once; each brings its ``LIBRARY``."""
    import esegeta.adapters

    for found in pkgutil.iter_modules(esegeta.adapters.__path__):
        module = importlib.import_module(f"esegeta.adapters.{found.name}")
        library = getattr(module, "LIBRARY", None)
        if isinstance(library, Library):
            _LIBRARIES.setdefault(library.name, library)


def libraries() -> Mapping[str, Library]:
    """Every library with an adapter module, by name."""
    all_methods()
    return MappingProxyType(_LIBRARIES)


def distributions() -> tuple[str, ...]:
    """The installed distributions behind the libraries (what the manifest records versions of)."""
    return tuple(lib.distribution for lib in libraries().values() if lib.distribution)


_loaded = False


def all_methods() -> Mapping[str, MethodSpec]:
    """Every registered method, by id (adapter modules are imported on first call)."""
    global _loaded
    if not _loaded:
        _loaded = True
        _load()
    return MappingProxyType(_REGISTRY)


def get(method_id: str, path: str = "id") -> MethodSpec:
    """The spec for ``method_id``, or a :class:`ConfigError` with the closest valid id."""
    registry = all_methods()
    if method_id in registry:
        return registry[method_id]
    raise ConfigError(path, f"unknown method {method_id!r}" + did_you_mean(method_id, registry))
