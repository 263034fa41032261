"""Analysis tools beside training and inference, one module each (e.g. :mod:`rsiseg.tools.anchors`)."""
