"""esegeta's small exception hierarchy.

Every error a user can cause names the field at fault and the fix. The CLI turns
:class:`ConfigError` into exit code 2 with no traceback.
"""
from __future__ import annotations

import difflib
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


class MethodUnavailable(EsegetaError):
    """A registered method whose library is not installed (the message says which extra)."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The most similar valid name, for 'did you mean ...?' hints (None if nothing is close)."""
    choices = list(choices)
    hits = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not hits:
        lowered = {c.lower(): c for c in choices}
        hits = [lowered[h] for h in difflib.get_close_matches(name.lower(), lowered, n=1, cutoff=0.6)]
    return hits[0] if hits else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Suffix for an error message: '; did you mean X?' or the list of valid names."""
    choices = sorted(choices)
    hit = closest(name, choices)
    if hit:
        return f"; did you mean {hit}?"
    shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return f"; valid: {shown}" if choices else ""
