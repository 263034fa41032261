"""Datasets, converters and data tools of rsiseg."""
