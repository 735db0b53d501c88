"""road metrics (being written)."""
