"""The version every layer may record (checkpoints, run metadata)."""

__version__ = "0.1.0"
