"""randomisation metrics (being written)."""
