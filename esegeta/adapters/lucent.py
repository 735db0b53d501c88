"""lucent adapter: being written (registers nothing yet)."""
