"""Converters from public remote-sensing release formats to COCO instance annotations (one file per format)."""
