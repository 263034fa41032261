"""YOLACT and RELACT: one-stage instance segmentation from prototypes and per-anchor coefficients."""
