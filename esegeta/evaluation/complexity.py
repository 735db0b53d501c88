"""complexity metrics (being written)."""
