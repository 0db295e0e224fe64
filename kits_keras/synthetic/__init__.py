"""Synthetic CT cases in the KiTS19 layout (no download needed)."""
