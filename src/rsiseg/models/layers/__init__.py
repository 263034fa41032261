"""Blocks shared by more than one model family (never a family's own modules)."""
