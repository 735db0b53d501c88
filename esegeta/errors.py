"""esegeta's small exception hierarchy.

Every error a user can cause names the field at fault and the fix. The CLI turns
:class:`ConfigError` into exit code 2 with no traceback.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from collections.abc import Iterable


class EsegetaError(Exception):
    """Base class of every error esegeta raises on purpose."""


class ConfigError(EsegetaError):
    """The config, or a file, name or parameter it refers to, is invalid.

    ``path`` is the JSON path of the fault, e.g. ``methods[2].params.n_step``.
    """

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class NonFiniteResult(EsegetaError):
    """A method's result holds NaN or Inf (or was computed from a non-finite input or score); the
    message says where the values came from: the input, the model's output, or the method."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the process (``signum``): a run stops taking jobs, ends or stops
    the running ones, keeps every finished result journaled, and the command exits ``128 + signum``."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"signal {signum}")


class MethodUnavailable(EsegetaError):
    """A registered method whose library is not installed (the message says which extra)."""


def json_path(parts: Iterable[str | int]) -> str:
    """A JSON path as messages write it: ``methods[2].params.n_steps``; a key that is not a
    plain ASCII name (or the top-level ``$schema``) is quoted, ``inputs["x y"]``, ``["$\\u00b9"]``."""
    out = ""
    for part in parts:
        out = child(out, part)
    return out


def child(path: str, key: str | int) -> str:
    """The JSON path of ``key`` inside ``path`` (``methods[0].params`` + ``n_steps``)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key), re.ASCII) or (key == "$schema" and not path):
        return f"{path}.{key}" if path else str(key)
    return f"{path}[{json.dumps(str(key), ensure_ascii=True)}]"


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages that repeat what a user wrote."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..." + f" ({len(text)} characters)"


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The most similar valid name, for 'did you mean ...?' hints (None if nothing is close)."""
    name = str(name)
    choices = [str(c) for c in choices]
    hits = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not hits:
        lowered = {c.lower(): c for c in choices}
        hits = [lowered[h] for h in difflib.get_close_matches(name.lower(), lowered, n=1, cutoff=0.6)]
    return hits[0] if hits else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Suffix for an error message: '; did you mean X?' or the list of valid names."""
    choices = sorted(str(c) for c in choices)
    hit = closest(str(name), choices)
    if hit:
        return f"; did you mean {hit}?"
    shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return f"; valid: {shown}" if choices else ""


@dataclass(frozen=True)
class Problem:
    """One reason a method entry (``entry``: its index in ``methods``; None: the config) cannot run."""
    path: str
    message: str
    entry: int | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    @classmethod
    def of(cls, exc: ConfigError, entry: int | None = None) -> "Problem":
        return cls(exc.path, exc.message, entry)


def raise_problems(problems: list[Problem]) -> None:
    """A ConfigError for one problem as it is, for several one per line; nothing if none."""
    if len(problems) == 1:
        raise ConfigError(problems[0].path, problems[0].message)
    if problems:
        raise ConfigError("", "\n".join(map(str, problems)))
