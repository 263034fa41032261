"""Inference: prediction, tiled large-scene inference, export of results and overlays.

Modules:

* ``predictor``: load a checkpoint, predict batches, evaluate a dataset (images only are read);
* ``paste``: per-box ``M x M`` mask probabilities (``roi_masks``) pasted inside their boxes
  only, as windows, RLEs, or (on request) full-size masks;
* ``export``: per-image predictions to COCO result entries with compressed-RLE masks, and an
  atomic JSON writer;
* ``visualize``: display conversion of any-band imagery (SAR, RGB, multispectral) and
  readable instance overlays (masks, boxes, labels, legend) for images from 128 px to 4000 px.

Nothing is imported here, so that importing one module does not pull in the others.
"""
