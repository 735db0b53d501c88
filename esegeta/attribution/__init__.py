"""Computing one explanation: the prepared model copy, wrappers, targets' scores, patches, batching,
precision, seeds, the guard that undoes every change, and :func:`explainer.explain`.

Imports only :mod:`esegeta.spec` and :mod:`esegeta.io` (and the ground modules); the adapters and
algorithms build on it.
"""
