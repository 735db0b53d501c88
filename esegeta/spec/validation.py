"""A pydantic ``ValidationError`` as esegeta's :class:`~esegeta.errors.ConfigError`: every fault named
by its JSON path (``methods[2].params.n_steps``), pydantic's union tags dropped, unknown keys with
a "did you mean"; the one formatter for the config and for the parts ``explain`` validates alone.
A model class may list keys that are planned but not yet supported in ``NOT_YET`` (key → message).
"""
from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from esegeta.errors import ConfigError, did_you_mean, json_path, shown


def _loc(loc: tuple) -> str:
    return json_path(loc)


def _model_at(loc: tuple, root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at ``loc`` (for 'did you mean' hints)."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = None
        for candidate in _flatten(annotation):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _flatten(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list):
        return [c for arg in typing.get_args(annotation) for c in _flatten(arg)]
    return [annotation]


def _real_loc(data: Any, loc: tuple, missing: bool = True) -> tuple:
    """``loc`` without pydantic's union-member tags (``constrained-int``, ``literal['predicted']``):
    only the keys and indices that exist in the validated ``data`` (and a last key that is missing)."""
    out: list = []
    here = data
    for i, part in enumerate(loc):
        if isinstance(here, dict) and part in here:
            out.append(part)
            here = here[part]
        elif isinstance(here, list) and isinstance(part, int) and 0 <= part < len(here):
            out.append(part)
            here = here[part]
        elif (missing and isinstance(here, dict) and isinstance(part, str) and i == len(loc) - 1
              and (part.isidentifier() or part == "$schema")):
            out.append(part)  # a required key that is missing (not a union tag: 'int', 'str', 'float')
    return tuple(out)


def _message(error: dict, data: Any, root: type[BaseModel] | None = None,
             not_yet: Mapping[str, str] = MappingProxyType({})) -> tuple[str, str]:
    """(JSON path, message) of one pydantic error of validating ``data`` as ``root`` (the Config)."""
    loc = _real_loc(data, tuple(error["loc"]), error["type"] == "missing")
    if error["type"] == "extra_forbidden" and loc and loc[-1] in not_yet:
        return _loc(loc), not_yet[loc[-1]]
    message = error["msg"].removeprefix("Value error, ")
    # Validators of a whole section name the key at fault as 'key: message'.
    owner = _model_at(loc + ("",), root)
    key, sep, rest = message.partition(": ")
    if sep and owner is not None and key in owner.model_fields:
        loc, message = loc + (key,), rest
    if error["type"] == "extra_forbidden":
        owner = _model_at(loc, root)
        keys = [f.alias or n for n, f in owner.model_fields.items()] if owner else []
        return _loc(loc), "unknown key" + did_you_mean(str(loc[-1]), keys)
    if error["type"] == "missing":
        message = "required key is missing"
    if "input" in error and error["type"].endswith(("_type", "_parsing")) and error["type"] != "model_type":
        message += f", not {shown(error['input'])}"
    return _loc(loc), message


def validation_error(exc: ValidationError, data: Any, root: type[BaseModel],
                     prefix: str = "", not_yet: Mapping[str, str] = MappingProxyType({})) -> ConfigError:
    """A pydantic error of validating ``data`` as ``root`` (the Config), as a ConfigError naming
    each field by its JSON path (under ``prefix``), with 'did you mean' for unknown keys."""
    by_path: dict[str, list[str]] = {}
    for error in exc.errors():
        path, message = _message(error, data, root, not_yet)
        if prefix:
            path = prefix + ("" if not path or path.startswith("[") else ".") + path
        if message not in by_path.setdefault(path, []):
            by_path[path].append(message)
    # A union (e.g. target: index or 'predicted') reports each member: one line per field.
    if len(by_path) == 1:
        path = next(iter(by_path))
        return ConfigError(path, " | or: ".join(by_path[path]))
    lines = [f"{path}: {' | or: '.join(messages)}" if path else "; ".join(messages)
             for path, messages in by_path.items()]
    return ConfigError("", "\n".join(lines))
