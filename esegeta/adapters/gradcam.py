"""gradcam adapter: being written (registers nothing yet)."""
