"""faithfulness metrics (being written)."""
