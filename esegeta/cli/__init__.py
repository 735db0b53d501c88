"""The ``esegeta`` command (:mod:`.commands`) and the TorchEsegeta converter."""
from esegeta.cli.commands import console, main

__all__ = ["console", "main"]
