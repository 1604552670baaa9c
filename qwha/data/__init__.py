"""Data sources: calibration / held-out text, fine-tuning sets, evaluation sets (offline and hub)."""
