"""Method parameters: checks of JSON values, defaults, batch sizes and the entry check.

- Value checks shared by the adapters: predicates (:func:`positive_int`, :func:`number`...)
  and tables of ``name → (predicate, what a valid value is)`` applied by :func:`check_table`.
- :func:`with_defaults`: the one place a spec's ``defaults`` (values, or functions of the
  input) fill the parameters a config left out.
- Batches: the parameters a library halves on out-of-memory and those that multiply its
  passes are facts of its :class:`~esegeta.spec.registry.Library`; :func:`halve_batch` returns new
  parameters (never changes them in place), :func:`effective_batch` estimates one step's size.
- :func:`check_method`: one method entry (id, layer, params, noise tunnel) against the registry.

This module imports neither torch nor any explainer library.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from esegeta.errors import ConfigError, child, did_you_mean
from esegeta.spec.values import check_parameter
from esegeta.spec import registry

if TYPE_CHECKING:
    import torch

    from esegeta.spec.registry import MethodSpec

#: A value check: (predicate, what a valid value is).
Check = tuple[Callable[[Any], bool], str]


# -- value checks ------------------------------------------------------------------
def integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive_int(v: Any) -> bool:
    return integer(v) and v > 0


def index(v: Any) -> bool:
    """An integer >= 0 (a channel, a position, a seed)."""
    return integer(v) and v >= 0


def number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def boolean(v: Any) -> bool:
    return isinstance(v, bool)


def seed(v: Any) -> bool:
    return v is None or index(v)


BOOL: Check = (boolean, "true or false")
POSITIVE_INT: Check = (positive_int, "a positive integer")


def channels_of_layer(*names: str) -> Callable[[Any, Any], list[ConfigError]]:
    """A method's pre-flight check (:attr:`esegeta.spec.registry.MethodSpec.preflight`) for the
    parameters ``names`` that index a channel of the entry's layer: each integer given must be below
    the layer's channel count (axis 1 of its output on the example input), so that ``validate``,
    ``check`` and ``run`` refuse an index the model does not have before anything runs."""
    def preflight(model: Any, context: Any) -> list[ConfigError]:
        given = {n: v for n, v in ((n, context.params.get(n)) for n in names) if integer(v)}
        shape = context.layer_shape() if given else None
        if shape is None or len(shape) < 2:
            return []
        return [ConfigError(f"params.{n}", f"channel {v} does not exist: layer {context.layer!r} has {shape[1]} "
                                           f"channels (its output is {list(shape)}); give 0 to {shape[1] - 1}")
                for n, v in given.items() if v >= shape[1]]

    return preflight


def check_table(table: Mapping[str, Check], name: str, value: Any, path: str) -> None:
    """ConfigError at ``path`` when ``table`` has a check for ``name`` that ``value`` fails."""
    check = table.get(name)
    if check is not None and not check[0](value):
        raise ConfigError(path, f"{name} must be {check[1]}, not {value!r}")


def check_number(name: str, value: Any, path: str, integers: frozenset[str] = frozenset()) -> None:
    """A number; a positive integer for the names in ``integers``."""
    if not number(value):
        raise ConfigError(path, f"{name} must be a number, not {value!r}")
    if name in integers and not positive_int(value):
        raise ConfigError(path, f"{name} must be a positive integer, not {value!r}")


# -- defaults ----------------------------------------------------------------------
def with_defaults(spec: MethodSpec, params: Mapping[str, Any], x: torch.Tensor) -> dict[str, Any]:
    """``params`` with the spec's defaults filled in where unset (a callable default is computed from ``x``)."""
    filled = {name: default(x) if callable(default) else default
              for name, default in spec.defaults.items() if name not in params}
    return {**filled, **params}


# -- batches -----------------------------------------------------------------------
def _default(accepted: Mapping[str, Any], name: str | None) -> Any:
    p = accepted.get(name) if name else None
    return None if p is None or p.default is p.empty else p.default


def batch_parameter(spec: MethodSpec, params: Mapping[str, Any],
                    noise_tunnel: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(section, name) of the internal batch parameter the method accepts, in the library's order
    of preference, or None; ``section`` is ``params`` or ``noise_tunnel``."""
    accepted = spec.parameters()
    nt_accepted = (spec.noise_tunnel_parameters() or {}) if noise_tunnel is not None else {}
    for name in spec.library.batch_params:
        if name in accepted:
            return "params", name
        if name in nt_accepted:
            return "noise_tunnel", name
    return None


def halve_batch(spec: MethodSpec, params: Mapping[str, Any], noise_tunnel: Mapping[str, Any] | None
                ) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """New (params, noise_tunnel) with the method's internal batch parameter halved, or None when
    it cannot shrink (no such parameter, already one, or its size unknown). An unset batch
    parameter stands for the whole count it batches (``n_steps``, ``nt_samples``)."""
    found = batch_parameter(spec, params, noise_tunnel)
    if found is None:
        return None
    section, name = found
    values = params if section == "params" else noise_tunnel
    accepted = spec.parameters() if section == "params" else spec.noise_tunnel_parameters()
    current = values.get(name, _default(accepted, name))
    if current is None:
        count = spec.library.batch_params[name]
        current = values.get(count, _default(accepted, count)) if count else None
        if count == "n_steps" and current is not None:
            current = int(current)
    if not integer(current) or current <= 1:
        return None
    params = dict(params)
    noise_tunnel = dict(noise_tunnel) if noise_tunnel is not None else None
    (params if section == "params" else noise_tunnel)[name] = current // 2
    return params, noise_tunnel


def effective_batch(spec: MethodSpec, params: Mapping[str, Any], noise_tunnel: Mapping[str, Any] | None) -> int:
    """How many copies of the input one step of the method sends through the model at once:
    its step count (the library's ``step_params``; ``n_steps × nt_samples`` under a noise tunnel)
    capped by its batch parameter; without a step count, a batch parameter that batches an
    unstated number of perturbations (Captum's ``perturbations_per_eval``) is the batch."""
    try:
        defaults = {n: p.default for n, p in spec.parameters().items() if p.default is not p.empty}
    except Exception:  # noqa: BLE001 (an adapter that cannot list its parameters: count one copy)
        defaults = {}
    values = {**{k: v for k, v in defaults.items() if isinstance(v, int)}, **params}
    if noise_tunnel is not None:
        values = {**values, **noise_tunnel}
        values.setdefault("nt_samples", 5)
    steps = next((int(values[k]) for k in spec.library.step_params if isinstance(values.get(k), int)), None)
    if noise_tunnel is not None and "n_steps" in values:
        steps = int(values["n_steps"]) * int(values.get("nt_samples", 5))
    batch = next(((k, int(values[k])) for k in spec.library.batch_params
                  if isinstance(values.get(k), int) and values[k] > 0), None)
    if batch is None:
        return max(1, steps or 1)
    name, chunk = batch
    if steps is None:  # no step count: a batch of perturbations whose number the library does not state
        return max(1, chunk) if spec.library.batch_params[name] is None else 1  # (Occlusion's perturbations_per_eval)
    return max(1, min(steps, chunk))


# -- one method entry --------------------------------------------------------------
NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def check_method(method_id: str, params: Mapping[str, Any], layer: str | list[str] | None,
                 noise_tunnel: Mapping[str, Any] | None, where: str, enabled: bool = True) -> MethodSpec:
    """Check one method entry against the registry and upstream (ConfigError at its JSON path);
    returns the spec. A disabled entry may still lack its layer (the converter writes such entries
    for the user to complete)."""
    spec = registry.get(method_id, f"{where}.id")
    reason = spec.unavailable_reason()
    if reason:
        raise ConfigError(f"{where}.id", f"{method_id} is unavailable: {reason}")
    if spec.needs_layer and not layer and enabled:
        raise ConfigError(f"{where}.layer", f"{method_id} needs a 'layer' (a submodule name of the model)"
                          if spec.fuses_layers < 2 else f"{method_id} needs a 'layer': a list of at least "
                          f"{spec.fuses_layers} submodule names of the model")
    if layer and not spec.needs_layer:
        raise ConfigError(f"{where}.layer", f"{method_id} takes no layer; remove 'layer'")
    if layer:
        _check_layers(spec, layer, f"{where}.layer")
    allowed = spec.parameters()
    for name, value in params.items():
        if name not in allowed:
            hint = " (set it with the entry's or the config's 'target')" if name == "target" else did_you_mean(name, allowed)
            raise ConfigError(child(f"{where}.params", name), f"unknown parameter for {method_id}{hint}")
        spec.adapter.check_value(name, value, child(f"{where}.params", name))
        check_parameter(name, value, allowed[name], child(f"{where}.params", name))
    for name, p in allowed.items():
        if p.default is p.empty and name not in params and name not in spec.defaults:
            raise ConfigError(f"{where}.params", f"{method_id} needs params.{name}")
    if noise_tunnel is not None:
        _check_noise_tunnel(spec, noise_tunnel, where)
    return spec


def _check_layers(spec: MethodSpec, layer: Any, where: str) -> None:
    """One layer name, or, for a method that fuses several (``fuses_layers``), a list of distinct names."""
    if not spec.fuses_layers:
        if not isinstance(layer, str):
            raise ConfigError(where, f"{spec.id} takes one layer: give its name, not {type(layer).__name__}")
        return
    names = [layer] if isinstance(layer, str) else layer
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(where, f"{spec.id} takes a list of submodule names")
    if len(set(names)) < len(names):
        raise ConfigError(where, f"{spec.id}: the list names a layer twice ({list(names)}): name each layer once")
    if len(names) < spec.fuses_layers:
        raise ConfigError(where, f"{spec.id} fuses {spec.fuses_layers} or more layers: give 'layer' as a list of "
                                 f"names, e.g. [\"layer3\", \"layer4\"] (got {list(names)})")


def _check_noise_tunnel(spec: MethodSpec, noise_tunnel: Mapping[str, Any], where: str) -> None:
    allowed = spec.noise_tunnel_parameters()
    if allowed is None:
        raise ConfigError(f"{where}.noise_tunnel", f"{spec.id} cannot be wrapped in a noise tunnel")
    for name in noise_tunnel:
        if name not in allowed:
            raise ConfigError(child(f"{where}.noise_tunnel", name),
                              "unknown noise_tunnel parameter" + did_you_mean(name, allowed))
        check_parameter(name, noise_tunnel[name], allowed[name], child(f"{where}.noise_tunnel", name))
    nt_type = noise_tunnel.get("nt_type", "smoothgrad")
    if nt_type not in NT_TYPES:
        raise ConfigError(f"{where}.noise_tunnel.nt_type", f"{nt_type!r} is not smoothgrad, smoothgrad_sq or vargrad")
