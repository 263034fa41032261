"""rsiseg: instance segmentation for remote-sensing imagery."""
__version__ = "0.1.0"
