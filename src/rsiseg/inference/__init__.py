"""Inference: prediction, tiled large-scene inference, export of results and overlays.

Modules:

* ``export``: per-image predictions (torchvision Mask R-CNN contract) to COCO result
  entries with compressed-RLE masks, and an atomic JSON writer;
* ``visualize``: display conversion of any-band imagery (SAR, RGB, multispectral) and
  readable instance overlays (masks, boxes, labels, legend) for images from 128 px to 4000 px.

Nothing is imported here, so that importing one module does not pull in the others.
"""
