"""shap adapter: being written (registers nothing yet)."""
