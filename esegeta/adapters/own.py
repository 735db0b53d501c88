"""own adapter: being written (registers nothing yet)."""
