"""Writes the shipped parameter tables (``esegeta/spec/signatures.json``) of every installed library:
``python -m esegeta.spec.shipped`` after an adapter or a library version changes (a test fails until then)."""
from __future__ import annotations

import json
from pathlib import Path

from esegeta.spec.registry import libraries
from esegeta.spec.signatures import FORMAT, SHIPPED, installed_version, table


def write_shipped(path: Path = SHIPPED) -> dict[str, str]:
    """Write the tables of every installed library to ``path`` (the shipped ``signatures.json``);
    returns library → version."""
    tables = {name: table(library) for name, library in sorted(libraries().items())
              if library.distribution is not None and installed_version(library) is not None}
    compact = {"separators": (",", ":"), "sort_keys": True}
    lines = ["{", f'"format": {FORMAT},', '"libraries": {']
    for i, (name, t) in enumerate(tables.items()):  # one method per line: a change shows as the lines it changes
        head = json.dumps({k: v for k, v in t.items() if k != "methods"}, **compact)[:-1]
        lines.append(f"{json.dumps(name)}: {head},\"methods\": {{")
        rows = [f"{json.dumps(mid)}: {json.dumps(entry, **compact)}" for mid, entry in sorted(t["methods"].items())]
        lines.append(",\n".join(rows))
        lines.append("}}" + ("," if i < len(tables) - 1 else ""))
    lines.append("}}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {name: t["version"] for name, t in tables.items()}


if __name__ == "__main__":
    for name, version in write_shipped().items():
        print(f"{name} {version}")
    print(f"wrote {SHIPPED}")
