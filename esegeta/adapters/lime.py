"""lime adapter: being written (registers nothing yet)."""
