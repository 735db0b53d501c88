"""robustness metrics (being written)."""
