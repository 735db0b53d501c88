"""One way to hold hooks that must be removed: :func:`removing`.

esegeta registers hooks on models for a forward pass or a block (recording outputs, counting
calls, swapping a backward weight) and every such hook must be gone afterwards, also when the
pass fails. ``removing`` is the one place that promise is kept: a ``with`` block that yields a
list; every handle in it when the block ends (normally or by an exception) is removed. No torch
needed (a handle is anything with ``remove()``), so the spec layer can use it too.

    with removing() as handles:
        handles.extend(m.register_forward_hook(record) for m in model.modules())
        model(x)

``extend`` with a generator keeps the handles registered before one that fails, so they are
removed too (a list comprehension would lose them). A handle removed early (e.g. by the hook
itself) is removed again harmlessly: torch's ``RemovableHandle.remove`` does nothing the second time.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def removing(*handles: Any) -> Iterator[list[Any]]:
    """Yield a list holding ``handles``; on exit, also on error, call ``remove()`` on everything in
    it. Every handle is removed even when one removal fails; then the first such failure is raised
    (chained to the block's own exception, if it raised one)."""
    held: list[Any] = list(handles)
    try:
        yield held
    finally:
        failure: BaseException | None = None
        for handle in held:
            try:
                handle.remove()
            except Exception as exc:  # noqa: BLE001 (the others still get removed; raised below)
                failure = failure or exc
        if failure is not None:
            raise failure
