"""Mask R-CNN baselines with remote-sensing anchors and dense-scene limits.

The model is assembled from torchvision's blocks (backbone + FPN, RPN, box and mask heads) as
torchvision's :class:`~torchvision.models.detection.MaskRCNN` is, with the same parameter names,
but with a compact mask path (:mod:`rsiseg.models.layers`). It takes ``images``, a list of float
``[C, H, W]`` tensors in [0, 1], and in training ``targets`` (``boxes`` float ``[N, 4]`` xyxy
pixels, ``labels`` int64 ``[N]`` in 1..K, ``masks`` :class:`~rsiseg.masks.InstanceMasks`),
returning a dict of scalar losses. In eval it returns, per image, ``boxes`` ``[D, 4]``,
``labels`` ``[D]``, ``scores`` ``[D]``, ``roi_masks`` float ``[D, 28, 28]`` (mask probabilities
inside each box) and ``image_size`` ``[2]``, at most ``detections_per_img`` detections (up to 1000).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from rsiseg.config import ModelConfig
from rsiseg.models.backbones.resnet_fpn import build_resnet_fpn
from rsiseg.models.layers.box_matching import DenseRegionProposalNetwork
from rsiseg.models.layers.rcnn_transform import CompactMaskTransform
from rsiseg.models.layers.roi_heads import CompactMaskRoIHeads

FPN_LEVELS = 5  # P2-P5 plus the pooled P6


def build_anchor_generator(cfg: ModelConfig, num_levels: int = FPN_LEVELS) -> AnchorGenerator:
    """Anchors per FPN level from ``anchor_sizes`` (one list per level) and ``anchor_ratios``.

    ``anchor_ratios`` is one list shared by all levels, or one list per level.
    """
    if len(cfg.anchor_sizes) != num_levels:
        raise ValueError(f"model.anchor_sizes needs {num_levels} lists (one per FPN level), got {len(cfg.anchor_sizes)}")
    ratios = cfg.anchor_ratios if len(cfg.anchor_ratios) == num_levels else cfg.anchor_ratios[:1] * num_levels
    if len(cfg.anchor_ratios) not in (1, num_levels):
        raise ValueError(f"model.anchor_ratios needs 1 or {num_levels} lists, got {len(cfg.anchor_ratios)}")
    return AnchorGenerator(
        sizes=tuple(tuple(int(s) for s in sizes) for sizes in cfg.anchor_sizes),
        aspect_ratios=tuple(tuple(float(r) for r in level) for level in ratios),
    )


def build_mask_rcnn(backbone: nn.Module, cfg: ModelConfig) -> GeneralizedRCNN:
    """Assemble Mask R-CNN on a backbone that has ``out_channels`` and returns 5 FPN levels."""
    _check_normalisation(cfg)
    if not 1 <= cfg.detections_per_img <= 1000:
        raise ValueError(f"model.detections_per_img must be in 1..1000, got {cfg.detections_per_img}")
    channels = backbone.out_channels
    anchors = build_anchor_generator(cfg)
    rpn = DenseRegionProposalNetwork(
        anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=cfg.rpn_fg_iou, bg_iou_thresh=cfg.rpn_bg_iou,
        batch_size_per_image=cfg.rpn_batch_size_per_image, positive_fraction=cfg.rpn_positive_fraction,
        pre_nms_top_n={"training": cfg.rpn_pre_nms_top_n_train, "testing": cfg.rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": cfg.rpn_post_nms_top_n_train, "testing": cfg.rpn_post_nms_top_n_test},
        nms_thresh=cfg.rpn_nms_thresh,
    )
    levels = ["0", "1", "2", "3"]
    box_dim = max(256, 4 * channels)  # 1024 for a 256-channel FPN, as in the reference model
    roi_heads = CompactMaskRoIHeads(
        MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        TwoMLPHead(channels * 7 * 7, box_dim),
        FastRCNNPredictor(box_dim, cfg.num_classes + 1),
        fg_iou_thresh=cfg.roi_fg_iou, bg_iou_thresh=cfg.roi_bg_iou,
        batch_size_per_image=cfg.roi_batch_size_per_image, positive_fraction=cfg.roi_positive_fraction,
        bbox_reg_weights=None, score_thresh=cfg.box_score_thresh, nms_thresh=cfg.box_nms_thresh,
        detections_per_img=cfg.detections_per_img,
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(channels, (channels,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(channels, channels, cfg.num_classes + 1),
    )
    transform = CompactMaskTransform(cfg.min_size, cfg.max_size, cfg.image_mean, cfg.image_std)
    return GeneralizedRCNN(backbone, rpn, roi_heads, transform)


def _check_normalisation(cfg: ModelConfig) -> None:
    for key in ("image_mean", "image_std"):
        values = getattr(cfg, key)
        if len(values) != cfg.in_channels:
            raise ValueError(f"model.{key} has {len(values)} values but model.in_channels is {cfg.in_channels}")
    if any(s <= 0 for s in cfg.image_std):
        raise ValueError(f"model.image_std must be positive, got {cfg.image_std}")


def _resnet_builder(depth_name: str):
    def build(cfg: ModelConfig) -> GeneralizedRCNN:
        backbone = build_resnet_fpn(
            depth_name,
            in_channels=cfg.in_channels,
            pretrained=cfg.pretrained,
            checkpoint=cfg.backbone_checkpoint,
            norm=cfg.norm,
            trainable_layers=cfg.trainable_layers,
            fpn_channels=cfg.fpn_channels,
        )
        return build_mask_rcnn(backbone, cfg)

    build.__name__ = f"build_maskrcnn_{depth_name}_fpn"
    build.__doc__ = f"Mask R-CNN with a {depth_name} FPN backbone."
    return build


build_maskrcnn_r18_fpn = _resnet_builder("resnet18")
build_maskrcnn_r34_fpn = _resnet_builder("resnet34")
build_maskrcnn_r50_fpn = _resnet_builder("resnet50")
build_maskrcnn_r101_fpn = _resnet_builder("resnet101")
