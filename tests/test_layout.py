"""The house's shape (``../shared/design/LAYOUT.md``): packages by concern, every import pointing down.

The import graph of ``esegeta/`` is read from the source (module-level and in-function imports
alike) and must have no circle, no arrow against the package order (``TYPE_CHECKING`` imports
included: they only name types, so they close no circle, but they point down too), and no
internal import hidden inside a function, except where laziness is the point: the command line's
dispatch and the adapters (``esegeta --help`` and ``esegeta methods`` import no torch), the
package's PEP 562 public names, and the registry's discovery of the adapters (the one arrow allowed up).
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "esegeta"

#: The package order, bottom first: a module may import its own package and those below it.
ORDER = {
    "ground": 0,        # esegeta.errors, esegeta.compat, esegeta.version, esegeta.moved, esegeta.hooks
    "spec": 1,
    "io": 2,
    "attribution": 3,
    "algorithms": 4,
    "adapters": 5,
    "evaluation": 5,
    "show": 5,
    "run": 6,
    "cli": 7,
    "top": 8,           # esegeta/__init__.py and __main__.py: the public face
}
GROUND = {"esegeta.errors", "esegeta.compat", "esegeta.version", "esegeta.moved", "esegeta.hooks"}
#: The one arrow allowed up: the registry finds the adapter modules (plug-in discovery).
ALLOWED_UP = {("esegeta.spec.registry", "esegeta.adapters")}
#: Where an internal import may sit inside a function (laziness on purpose, see the docstring).
LAZY_ALLOWED = {"esegeta", "esegeta.spec.registry"}
#: The adapters are the registry's plug-ins: ``esegeta methods`` lists them without importing torch,
#: so the attribution modules (which import torch) are imported where a method runs.
LAZY_PACKAGES = ("esegeta.cli.", "esegeta.adapters.")


@dataclass(frozen=True)
class Arrow:
    source: str
    target: str
    line: int
    in_function: bool
    type_only: bool = False


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _targets(module: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [_owner(a.name, modules) for a in node.names if a.name.split(".")[0] == "esegeta"]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    if name.split(".")[0] != "esegeta":
        return []
    return [f"{name}.{a.name}" if f"{name}.{a.name}" in modules else _owner(name, modules) for a in node.names]


def _owner(name: str, modules: dict[str, Path]) -> str:
    """The module ``name`` refers to (``esegeta.x.y`` may be an attribute of ``esegeta.x``)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def import_graph() -> tuple[dict[str, Path], list[Arrow]]:
    modules = _modules()
    arrows = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        type_only = {id(n) for f in tree.body if isinstance(f, ast.If) and "TYPE_CHECKING" in ast.unparse(f.test)
                     for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, path, node, modules):
                    if target != module and not module.startswith(target + "."):
                        arrows.append(Arrow(module, target, node.lineno, id(node) in in_function, id(node) in type_only))
    return modules, arrows


def layer(module: str) -> str:
    if module in GROUND:
        return "ground"
    if module in ("esegeta", "esegeta.__main__"):
        return "top"
    return module.split(".")[1]


def _cycles(modules, arrows) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    edges = defaultdict(set)
    for a in arrows:
        if not a.type_only:
            edges[a.source].add(a.target)
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    return found


def test_every_module_belongs_to_a_known_layer():
    modules, _ = import_graph()
    unknown = sorted(m for m in modules if layer(m) not in ORDER)
    assert not unknown, f"modules outside the package order (add a package to ORDER or move them): {unknown}"


def test_no_import_circle():
    modules, arrows = import_graph()
    assert _cycles(modules, arrows) == []


def test_every_import_points_down():
    _, arrows = import_graph()
    up = [f"{a.source}:{a.line} -> {a.target} ({layer(a.source)} imports {layer(a.target)})" for a in arrows
          if (a.source, a.target) not in ALLOWED_UP
          and layer(a.source) != layer(a.target) and ORDER[layer(a.target)] >= ORDER[layer(a.source)]]
    assert not up, "imports against the package order:\n" + "\n".join(up)


def test_internal_imports_sit_at_module_level():
    """An import inside a function only for optional third-party libraries (lazy), never to dodge a circle."""
    _, arrows = import_graph()
    hidden = [f"{a.source}:{a.line} -> {a.target}" for a in arrows if a.in_function
              and a.source not in LAZY_ALLOWED and not a.source.startswith(LAZY_PACKAGES)]
    assert not hidden, "internal imports inside functions:\n" + "\n".join(hidden)


def test_the_graph_sees_a_circle(tmp_path):
    """The checks above can fail: the graph builder finds a circle hidden in a function."""
    a = Arrow("esegeta.x", "esegeta.y", 1, False)
    b = Arrow("esegeta.y", "esegeta.x", 1, True)
    assert _cycles({"esegeta.x": None, "esegeta.y": None}, [a, b]) == [["esegeta.x", "esegeta.y"]]


@pytest.mark.parametrize("old, new", [("esegeta.store", "esegeta.io.store"), ("esegeta.runner", "esegeta.run.runner"),
                                      ("esegeta.evaluation.quantus", "esegeta.evaluation.quantus")])
def test_documented_imports_still_work(old, new):
    import importlib
    import warnings

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert importlib.import_module(old) is importlib.import_module(new)


def test_no_module_uses_an_old_name():
    """The aliases of :mod:`esegeta.moved` are for users' code; esegeta's own imports name the new homes."""
    from esegeta.moved import MOVED

    _, arrows = import_graph()
    modules = _modules()
    assert not [a for a in arrows if a.target not in modules]
    sources = [p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py") if p.name != "moved.py"]
    old = [name for name in MOVED if any(f"import {name}\n" in s or f"from {name} import" in s for s in sources)]
    assert not old


def test_package_relative_paths_still_resolve():
    """Paths computed from a module's own place survived the move: the demo's config and the
    signature cache's fingerprint (which must cover the adapters, whose tables state the parameters)."""
    from esegeta.cli.commands import DEMO_CONFIG
    from esegeta.spec import registry, signatures

    assert DEMO_CONFIG.is_file()
    before = signatures.fingerprint(registry.libraries()["captum"])
    adapter = PACKAGE / "adapters" / "captum.py"
    stat = adapter.stat()
    import os

    os.utime(adapter, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    try:
        assert signatures.fingerprint(registry.libraries()["captum"]) != before
    finally:
        os.utime(adapter, ns=(stat.st_atime_ns, stat.st_mtime_ns))
