"""zennit adapter: being written (registers nothing yet)."""
