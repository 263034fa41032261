"""Evaluation: COCO bbox/segm metrics (``coco``), semantic-segmentation metrics and efficiency figures.

Import what you need from the submodules, e.g. ``from rsiseg.evaluation.coco import evaluate_coco``;
this package imports nothing on its own so that loading it stays cheap.
"""
