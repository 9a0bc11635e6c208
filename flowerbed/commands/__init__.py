"""Top-level commands: init, run, demo (one module each)."""
