"""esegeta: explainability meta-package for PyTorch models."""
__version__ = "0.1.0"
