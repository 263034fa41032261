"""Subcommand bodies behind ``rsiseg.cli`` (kept apart so that cli.py stays argument parsing only)."""
