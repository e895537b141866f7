"""The built-in demo bundle: its training script, evaluation metrics and model card."""
