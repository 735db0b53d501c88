"""localisation metrics (being written)."""
