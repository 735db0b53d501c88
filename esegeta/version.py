"""esegeta's version (a ground module: the runner records it, the command prints it)."""
__version__ = "0.1.0"
