"""Models. ``rsiseg.models.registry.MODELS`` maps a name to its builder."""
