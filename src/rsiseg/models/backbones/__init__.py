"""Backbones: feature extractors returning FPN-ready multi-scale maps."""
