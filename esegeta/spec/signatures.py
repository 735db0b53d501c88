"""What a config may set for each method, without importing its library every time.

A method's parameters (:meth:`esegeta.spec.registry.MethodSpec.parameters`) come from its
adapter, which reads them from the upstream signatures: asking means importing the library
(``captum.attr`` alone takes about 0.5 s, ``pytorch_grad_cam`` 3 s). ``esegeta validate``
only needs names, kinds, defaults and annotations, so they are looked up, in this order:

1. ``signatures.json`` beside this module: the tables of the library versions installed
   when they were written (those the test suite runs), used when the installed version is the same. They are
   written by ``python -m esegeta.spec.signatures``, and ``tests/test_signatures.py`` fails when
   one no longer equals what the adapter says (an adapter changed: write them again).
2. A file per library in the user's cache folder (``$ESEGETA_CACHE_DIR``, else
   :func:`platformdirs.user_cache_dir`), written the first time a library is asked, keyed
   by a fingerprint of what the answer depends on: the Python version, esegeta's source files
   and the installed library (its top-level module files' size and modification time: a
   reinstall or an upgrade changes them), so it is never stale. A cache that cannot be read
   or written is ignored; ``ESEGETA_CACHE_DIR=""`` switches it off.
3. The adapter itself (which imports the library).

A parameter keeps its name and kind; its default if JSON can hold it (a tuple stays a
tuple), else an :class:`Opaque` stand-in with the original's ``repr``; its annotation as
:func:`esegeta.spec.values.annotation_text` writes it, which :func:`esegeta.spec.values.annotation_of`
reads back to a type with the same verdicts on every JSON value.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esegeta.spec.values import annotation_of, annotation_text

if TYPE_CHECKING:
    from esegeta.spec.registry import Library, MethodSpec

#: Bumped when the file's layout changes.
FORMAT = 1
#: The shipped tables (see the module docstring).
SHIPPED = Path(__file__).with_name("signatures.json")
#: The parameters of one method: what :meth:`Adapter.parameters` returns.
Parameters = Mapping[str, inspect.Parameter]

_lock = threading.RLock()
_memory: dict[tuple[str, str], Parameters | None] = {}
_files: dict[str, dict[str, Any]] = {}


class Opaque:
    """A default JSON cannot hold (a function, a tensor): only its ``repr`` is kept."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def cache_dir() -> Path | None:
    """The folder of the cache files, or None when the cache is off (``ESEGETA_CACHE_DIR=""``)."""
    configured = os.environ.get("ESEGETA_CACHE_DIR")
    if configured is not None:
        return Path(configured).expanduser() if configured.strip() else None
    import platformdirs

    return Path(platformdirs.user_cache_dir("esegeta"))


def parameters(spec: MethodSpec) -> Parameters:
    """``spec.adapter.parameters(spec)``, from the cache when its library's file is current."""
    return _lookup(spec, "params", lambda: spec.adapter.parameters(spec))


def noise_tunnel_parameters(spec: MethodSpec) -> Parameters | None:
    """What the method's ``noise_tunnel`` block may set (None: it takes none), cached as :func:`parameters`."""
    if spec.noise_tunnel is None:
        return None
    return _lookup(spec, "noise_tunnel", spec.noise_tunnel)


def _lookup(spec: MethodSpec, section: str, compute: Callable[[], Parameters]) -> Parameters:
    key = (spec.id, section)
    with _lock:
        if key in _memory:
            return _memory[key]
        found = _section(_shipped(spec.library), spec.id, section)
        folder = cache_dir() if found is None else None
        if folder is not None:
            found = _section(_stored(spec.library, folder), spec.id, section)
        if found is not None:
            _memory[key] = _decode(found)
            return _memory[key]
        value = compute()  # imports the library (an error propagates, as without a cache)
        _memory[key] = value
        if folder is not None and spec.library.distribution is not None:
            _store(spec.library, folder)
        return value


def _section(table: dict[str, Any] | None, method_id: str, section: str) -> list[dict[str, Any]] | None:
    return (table or {}).get("methods", {}).get(method_id, {}).get(section)


# -- the files ---------------------------------------------------------------------
def fingerprint(library: Library) -> str:
    """A digest of what ``library``'s parameters depend on (see the module docstring)."""
    parts = [f"format {FORMAT}", sys.version]
    package = Path(__file__).resolve().parents[1]  # the whole esegeta package: adapters state the parameters
    for path in sorted(package.rglob("*.py")):
        stat = path.stat()
        parts.append(f"{path.relative_to(package)} {stat.st_size} {stat.st_mtime_ns}")
    for module in library.requires:
        found = importlib.util.find_spec(module)
        origin = found.origin if found is not None else None
        if origin and os.path.exists(origin):
            stat = os.stat(origin)
            parts.append(f"{module} {origin} {stat.st_size} {stat.st_mtime_ns}")
        else:
            parts.append(f"{module} missing")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def installed_version(library: Library) -> str | None:
    """The installed version of the library's distribution (None: esegeta's own, or not installed)."""
    if library.distribution is None:
        return None
    try:
        return importlib.metadata.version(library.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@cache
def _shipped_tables() -> dict[str, Any]:
    try:
        return json.loads(SHIPPED.read_text(encoding="utf-8")).get("libraries", {})
    except (OSError, ValueError):
        return {}


def _shipped(library: Library) -> dict[str, Any] | None:
    """The shipped table of ``library`` if it is for the installed version."""
    shipped = _shipped_tables().get(library.name)
    if shipped is None or shipped.get("version") != installed_version(library):
        return None
    return shipped


def table(library: Library) -> dict[str, Any]:
    """Every method of ``library`` with its parameters, as the cache files hold them (imports the library)."""
    methods: dict[str, dict[str, Any]] = {}
    for spec in library.methods:
        entry: dict[str, Any] = {}
        for section, compute in (("params", lambda s=spec: s.adapter.parameters(s)),
                                 ("noise_tunnel", spec.noise_tunnel)):
            if compute is None:
                continue
            try:
                entry[section] = _encode(compute())
            except Exception:  # noqa: BLE001 (a method whose parameters cannot be read now is asked again later)
                continue
        methods[spec.id] = entry
    return {"format": FORMAT, "library": library.name, "distribution": library.distribution,
            "version": installed_version(library), "methods": methods}


def _path(library: Library, folder: Path) -> Path:
    """One file per library and Python environment (two virtual environments do not overwrite each other's)."""
    environment = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    return folder / f"signatures-{library.name}-{environment}.json"


def _stored(library: Library, folder: Path) -> dict[str, Any] | None:
    """The library's cache file if it is current, else None (read once per process)."""
    if library.name not in _files:
        data: dict[str, Any] = {}
        try:
            loaded = json.loads(_path(library, folder).read_text(encoding="utf-8"))
            if isinstance(loaded, dict) and loaded.get("fingerprint") == fingerprint(library):
                data = loaded
        except (OSError, ValueError):
            pass
        _files[library.name] = data
    return _files[library.name] or None


def _store(library: Library, folder: Path) -> None:
    """Write every method of ``library`` to its cache file (its library is imported by now)."""
    data = {**table(library), "fingerprint": fingerprint(library)}
    path = _path(library, folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        partial.write_text(json.dumps(data, indent=1, allow_nan=False), encoding="utf-8")
        os.replace(partial, path)  # whole or not at all: a reader never sees half a file
    except (OSError, ValueError):
        return
    _files[library.name] = data


# -- one parameter as JSON ---------------------------------------------------------
def _encode(params: Parameters) -> list[dict[str, Any]]:
    return [_encode_one(p) for p in params.values()]


def _encode_one(p: inspect.Parameter) -> dict[str, Any]:
    row: dict[str, Any] = {"name": p.name, "kind": int(p.kind)}
    if p.default is not p.empty:
        row["default"] = _encode_default(p.default)
    if p.annotation is not p.empty:
        row["annotation"] = annotation_text(annotation_of(p))
    return row


def _json_value(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_json_value(v) for v in value)
    return False


def _encode_default(value: Any) -> dict[str, Any]:
    if type(value) is tuple and _json_value(list(value)):
        return {"tuple": list(value)}
    if type(value) in (type(None), bool, int, float, str, list) and _json_value(value):
        return {"value": value}
    return {"repr": re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))}  # no address: the same in every process


def _decode(rows: list[dict[str, Any]]) -> dict[str, inspect.Parameter]:
    out = {}
    for row in rows:
        default = row.get("default")
        if default is None:
            value: Any = inspect.Parameter.empty
        elif "tuple" in default:
            value = tuple(default["tuple"])
        elif "value" in default:
            value = default["value"]
        else:
            value = Opaque(default["repr"])
        annotation = row.get("annotation", inspect.Parameter.empty)
        out[row["name"]] = inspect.Parameter(row["name"], inspect._ParameterKind(row["kind"]), default=value,
                                             annotation=annotation)
    return out
