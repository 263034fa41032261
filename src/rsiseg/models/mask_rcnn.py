"""Mask R-CNN baselines (ResNet-18/34/50/101 + FPN) with remote-sensing anchors and dense-scene limits.

Assembled by :func:`~rsiseg.models.layers.rcnn_assembly.assemble_mask_rcnn` with torchvision's
heads. The models take ``images``, a list of float ``[C, H, W]`` tensors in [0, 1], and in
training ``targets`` (``boxes`` float ``[N, 4]`` xyxy pixels, ``labels`` int64 ``[N]`` in 1..K,
``masks`` :class:`~rsiseg.masks.InstanceMasks`), returning a dict of scalar losses. In eval they
return, per image, ``boxes`` ``[D, 4]``, ``labels`` ``[D]``, ``scores`` ``[D]``, ``roi_masks``
float ``[D, 28, 28]`` (mask probabilities inside each box) and ``image_size`` ``[2]``, at most
``detections_per_img`` detections (up to 1000).
"""

from __future__ import annotations

from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from rsiseg.config import ModelConfig
from rsiseg.models.backbones.resnet_fpn import resnet_fpn_from_config
from rsiseg.models.layers.rcnn_assembly import assemble_mask_rcnn


def _resnet_builder(depth_name: str):
    def build(cfg: ModelConfig) -> GeneralizedRCNN:
        return assemble_mask_rcnn(resnet_fpn_from_config(cfg, depth_name), cfg)

    build.__name__ = f"build_maskrcnn_{depth_name}_fpn"
    build.__doc__ = f"Mask R-CNN with a {depth_name} FPN backbone."
    return build


build_maskrcnn_r18_fpn = _resnet_builder("resnet18")
build_maskrcnn_r34_fpn = _resnet_builder("resnet34")
build_maskrcnn_r50_fpn = _resnet_builder("resnet50")
build_maskrcnn_r101_fpn = _resnet_builder("resnet101")
