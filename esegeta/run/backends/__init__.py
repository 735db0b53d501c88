"""Where a run's jobs execute: ``runtime.backend``.

- ``"local"`` (default): the worker threads of :mod:`esegeta.run.executor`, in this process.
- ``"ray"``: Ray Data actors, one model replica each, on a Ray cluster (:mod:`esegeta.run.backends.ray`;
  ``pip install 'esegeta[ray]'``).

Either way the writer of this process writes every result, so outputs, manifest and
``--resume`` are the same.
"""
from __future__ import annotations

from esegeta.errors import ConfigError


def check(backend: str) -> None:
    """A ConfigError naming ``runtime.backend`` if ``backend`` cannot run here."""
    if backend != "ray":
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError("runtime.backend", "'ray' needs Ray, which is not installed: pip install 'esegeta[ray]' "
                                             "(or use the default backend, 'local')") from None
