"""A JSON parameter value against the upstream signature, before anything runs.

:func:`check_parameter` checks a value a config gives an upstream keyword against what the
upstream callable declares for it: its annotation (``int``, ``float``, ``bool``, ``str``,
``Optional[...]``, ``Union[...]``, ``Tuple[float, ...]``, ``List[int]``, ``Literal[...]``; a
type JSON cannot write, such as a tensor or a callable, is left to the adapter), or for an
unannotated parameter its default (a number's default refuses strings and booleans), and
esegeta's own rules: counts (``n_steps``, ``nt_samples``, ``num_samples``, ...)
are integers from 1 to :data:`MAX_COUNT`, ``stdevs`` are not negative. Numbers are finite
everywhere already (:func:`esegeta.spec.config.check_values`). So ``n_steps: "32"``, ``"~"`` or ``0``
are refused with the field and the fix instead of failing inside the library.

That strictness is for JSON text, where ``"32"`` is not 32. Values given from Python
(``esegeta.explain(..., sliding_window_shapes=(3, 8, 8), n_steps=np.int64(32))``) take the
forms upstream signatures accept: :func:`from_python` writes them as a JSON config would
(a tuple of numbers as a list, a NumPy or torch scalar as the Python number) before the same
checks, so both paths meet one set of rules and esegeta's code downstream (adapters' conversions,
pre-flight checks, cost and batch estimates) sees one form; tensors, arrays and callables pass
through as they are.
"""
from __future__ import annotations

import collections.abc
import inspect
import sys
import types
import typing
from typing import Any

from esegeta.errors import ConfigError, shown

#: Parameters that count samples, steps or batch members: integers from 1 to :data:`MAX_COUNT`.
COUNTS = frozenset({
    "n_steps", "nt_samples", "n_samples", "num_samples", "internal_batch_size",
    "perturbations_per_eval", "nt_samples_batch_size", "batch_size", "num_features", "max_iter",
    "n_iterations", "num_masks", "num_segments",
})
#: The largest count a config may give (more is a typo: a day of work on a small model).
MAX_COUNT = 1_000_000
#: Parameters that must not be negative.
NON_NEGATIVE = frozenset({"stdevs", "eps", "epsilon", "sigma", "kernel_width", "noise_level", "alpha", "beta"})


class _Unknown:
    """Stands for a name an annotation uses that JSON cannot hold (``Tensor``, ``Callable``)."""

    def __getattr__(self, name: str) -> _Unknown:
        return self

    def __getitem__(self, item: Any) -> _Unknown:
        return self

    def __or__(self, other: Any) -> _Unknown:
        return self

    __ror__ = __or__


UNKNOWN = _Unknown()


class _Names(dict):
    def __missing__(self, key: str) -> Any:
        return UNKNOWN


_TYPING = {name: getattr(typing, name) for name in ("Optional", "Union", "Tuple", "List", "Literal", "Any",
                                                    "Sequence", "Dict")}
_BUILTINS = {"int": int, "float": float, "bool": bool, "str": str, "None": None, "tuple": tuple, "list": list,
             "dict": dict}


def annotation_of(parameter: inspect.Parameter) -> Any:
    """The parameter's annotation as a type (a string annotation evaluated over plain and
    ``typing`` names only; what it cannot name becomes :data:`UNKNOWN`)."""
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return UNKNOWN
    if isinstance(annotation, str):
        try:
            return eval(annotation, {"__builtins__": {}}, _Names(_TYPING | _BUILTINS | {"typing": typing}))  # noqa: S307
        except Exception:  # noqa: BLE001 (an annotation we cannot read: accept anything)
            return UNKNOWN
    return annotation


def _is_union(origin: Any) -> bool:
    """``Union[...]``/``Optional[...]`` or ``X | Y``."""
    return origin is typing.Union or origin is types.UnionType


def annotation_text(annotation: Any) -> str:
    """``annotation`` (a type, as :func:`annotation_of` returns) written so that
    :func:`annotation_of` reads it back with the same verdict on every JSON value: the types
    :func:`_fits` tells apart keep their form, anything else becomes ``Any`` (which accepts
    everything, as an annotation JSON cannot write does). Used to cache upstream signatures."""
    if annotation is None or annotation is type(None):
        return "None"
    if annotation in (bool, int, float, str, dict, tuple, list):
        return annotation.__name__
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if _is_union(origin):
        return "Union[" + ", ".join(annotation_text(a) for a in args) + "]"
    if origin is typing.Literal:
        scalars = all(a is None or type(a) in (bool, int, float, str) for a in args)
        return "Literal[" + ", ".join(map(repr, args)) + "]" if scalars and args else "Any"
    if origin in (tuple, list, collections.abc.Sequence):
        name = {tuple: "Tuple", list: "List"}.get(origin, "Sequence")
        if not args:
            return name
        return f"{name}[" + ", ".join("..." if a is Ellipsis else annotation_text(a) for a in args) + "]"
    if origin is dict:
        return "dict"
    return "Any"


def _fits(value: Any, annotation: Any) -> bool | None:
    """True/False whether ``value`` fits ``annotation``; None when the annotation cannot tell."""
    if annotation is UNKNOWN or annotation is Any or annotation is inspect.Parameter.empty:
        return None
    if annotation is None or annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if _is_union(origin):
        answers = [_fits(value, arg) for arg in typing.get_args(annotation)]
        return True if any(a is True for a in answers) else None if any(a is None for a in answers) else False
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (tuple, list, collections.abc.Sequence) or annotation in (tuple, list):
        if not isinstance(value, list):
            return False
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if not args:
            return True
        answers = [_fits(v, args[0] if len(args) == 1 or Ellipsis in typing.get_args(annotation) else args[min(i, len(args) - 1)])
                   for i, v in enumerate(value)]
        return False if any(a is False for a in answers) else None if any(a is None for a in answers) else True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    return None


def _describe(annotation: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", None: "null",
             type(None): "null"}
    if annotation in names:
        return names[annotation]
    origin = typing.get_origin(annotation)
    if _is_union(origin):
        parts = [_describe(a) for a in typing.get_args(annotation)]
        return " or ".join(dict.fromkeys(p for p in parts if p))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    if origin in (tuple, list, collections.abc.Sequence) or annotation in (tuple, list):
        return "a list"
    if annotation is dict or origin is dict:
        return "an object ({...})"
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def check_parameter(name: str, value: Any, parameter: inspect.Parameter | None, path: str) -> None:
    """ConfigError at ``path`` when ``value`` cannot be what upstream's ``parameter`` takes, or
    breaks esegeta's own rules for ``name`` (see the module docstring)."""
    if name in COUNTS and value is not None:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_COUNT:
            raise ConfigError(path, f"{name} counts, so it is an integer from 1 to {MAX_COUNT:,}, not {shown(value)}")
        return
    if name in NON_NEGATIVE and _negative(value):
        raise ConfigError(path, f"{name} must not be negative, not {shown(value)}")
    if parameter is None:
        return
    annotation = annotation_of(parameter)
    if annotation is UNKNOWN:  # unannotated: the default tells only what is surely wrong
        default = parameter.default
        if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, (str, bool)):
            raise ConfigError(path, f"{name} takes numbers (its default is {default!r}), not {shown(value)}")
        return
    if _fits(value, annotation) is False:
        raise ConfigError(path, f"{name} must be {_describe(annotation)}, not {shown(value)}")


_JSON_SCALARS = (bool, int, float, str, type(None))


def _scalar(value: Any) -> Any:
    """A NumPy scalar (or 0-d array) or a 0-d torch tensor as its Python number; else ``value``
    (neither library is imported here: only values of an imported one can be such scalars)."""
    numpy, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    if numpy is not None and isinstance(value, (numpy.generic, numpy.ndarray)) and value.ndim == 0:
        return value.item()
    if torch is not None and torch.is_tensor(value) and value.ndim == 0:
        return value.item()
    return value


def _json_form(value: Any) -> bool:
    if isinstance(value, list):
        return all(map(_json_form, value))
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_form(v) for k, v in value.items())
    return isinstance(value, _JSON_SCALARS)


def from_python(value: Any) -> Any:
    """``value``, given from Python, written as a JSON config would write it: NumPy and torch
    scalars as Python numbers, a tuple (``torch.Size`` too) of such values as a list, inside
    lists, tuples and dicts too (new containers: the caller's are not changed). A tuple holding
    anything JSON cannot (a tensor, a callable) stays a tuple; tensors, arrays, callables and
    other objects are returned as they are."""
    value = _scalar(value)
    if isinstance(value, dict):
        return {k: from_python(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_python(v) for v in value]
    if isinstance(value, tuple):
        items = [from_python(v) for v in value]
        return items if _json_form(items) else tuple(items)
    return value


def _negative(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value < 0
    if isinstance(value, list):
        return any(_negative(v) for v in value)
    return False
