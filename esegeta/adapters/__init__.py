"""Adapters: one module per explainer library, each registering its methods from a table."""
