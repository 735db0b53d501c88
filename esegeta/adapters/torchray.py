"""torchray adapter: being written (registers nothing yet)."""
