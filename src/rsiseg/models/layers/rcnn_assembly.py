"""Assembling a Mask R-CNN from a backbone and optional heads: shared by every Mask R-CNN family.

The model is put together from torchvision's blocks as torchvision's
:class:`~torchvision.models.detection.MaskRCNN` is, with the same parameter names, but with the
compact mask path of this package (:class:`~rsiseg.models.layers.roi_heads.CompactMaskRoIHeads`,
:class:`~rsiseg.models.layers.rcnn_transform.CompactMaskTransform`) and the dense-scene limits.
A family passes its own box or mask head; left out, torchvision's are used. A family that changes
the RPN, the RoI heads or the model's forward passes its own classes (subclasses of the defaults,
taking the same arguments plus its own ``roi_heads_kwargs``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead

from rsiseg.config import ModelConfig
from rsiseg.models.layers.box_matching import DenseRegionProposalNetwork
from rsiseg.models.layers.rcnn_transform import CompactMaskTransform
from rsiseg.models.layers.roi_align import SparseRoIAlign
from rsiseg.models.layers.roi_heads import CompactMaskRoIHeads

FPN_LEVELS = 5  # P2-P5 plus the pooled P6
ROI_LEVELS = ["0", "1", "2", "3"]  # RoIs are pooled from P2-P5


class RoIHeadParts(NamedTuple):
    """A family's own RoI heads. ``box_head`` maps ``[K, C, 7, 7]`` to ``[K, box_dim]``;
    ``box_predictor`` maps that to class logits ``[K, num_classes + 1]`` and deltas
    ``[K, 4 (num_classes + 1)]``; ``mask_head`` maps ``[K, C, 14, 14]`` to ``[K, C', 14, 14]`` and
    ``mask_predictor`` that to logits ``[K, num_classes + 1, 28, 28]``."""

    box_head: nn.Module
    box_predictor: nn.Module
    mask_head: nn.Module
    mask_predictor: nn.Module


def build_anchor_generator(cfg: ModelConfig, num_levels: int = FPN_LEVELS) -> AnchorGenerator:
    """Anchors per FPN level from ``anchor_sizes`` (one list per level) and ``anchor_ratios``.

    ``anchor_ratios`` is one list shared by all levels, or one list per level.
    """
    if len(cfg.anchor_sizes) != num_levels:
        raise ValueError(f"model.anchor_sizes needs {num_levels} lists (one per FPN level), got {len(cfg.anchor_sizes)}")
    ratios = cfg.anchor_ratios if len(cfg.anchor_ratios) == num_levels else cfg.anchor_ratios[:1] * num_levels
    if len(cfg.anchor_ratios) not in (1, num_levels):
        raise ValueError(f"model.anchor_ratios needs 1 or {num_levels} lists, got {len(cfg.anchor_ratios)}")
    counts = {len(sizes) * len(level) for sizes, level in zip(cfg.anchor_sizes, ratios)}
    if len(counts) > 1:  # one RPN head is shared by every level
        raise ValueError(f"model.anchor_sizes x anchor_ratios must give the same anchors per location on every "
                         f"level (one RPN head serves them all), got {sorted(counts)}")
    return AnchorGenerator(
        sizes=tuple(tuple(int(s) for s in sizes) for sizes in cfg.anchor_sizes),
        aspect_ratios=tuple(tuple(float(r) for r in level) for level in ratios),
    )


def default_roi_head_parts(channels: int, num_classes: int) -> RoIHeadParts:
    """torchvision's heads: a 2-FC box head and a 4-conv mask head on ``channels``-channel features."""
    box_dim = max(256, 4 * channels)  # 1024 for a 256-channel FPN, as in the reference model
    return RoIHeadParts(
        TwoMLPHead(channels * 7 * 7, box_dim), FastRCNNPredictor(box_dim, num_classes + 1),
        MaskRCNNHeads(channels, (channels,) * 4, 1), MaskRCNNPredictor(channels, channels, num_classes + 1),
    )


def assemble_mask_rcnn(
    backbone: nn.Module, cfg: ModelConfig, heads: RoIHeadParts | None = None, *,
    rpn_cls: type[DenseRegionProposalNetwork] = DenseRegionProposalNetwork, rpn_kwargs: dict[str, Any] | None = None,
    roi_heads_cls: type[CompactMaskRoIHeads] = CompactMaskRoIHeads, roi_heads_kwargs: dict[str, Any] | None = None,
    model_cls: type[GeneralizedRCNN] = GeneralizedRCNN,
) -> GeneralizedRCNN:
    """Mask R-CNN on a backbone that has ``out_channels`` and returns 5 FPN levels (``"0"``-``"3"``, ``"pool"``).

    Args:
        backbone: maps ``[B, C, H, W]`` to ``{"0": P2, ..., "3": P5, "pool": P6}``.
        cfg: the model config (anchors, RPN and RoI sampling, limits, normalisation).
        heads: a family's RoI heads; torchvision's (:func:`default_roi_head_parts`) when None.
        rpn_cls, roi_heads_cls, model_cls: a family's subclasses of the RPN, the RoI heads and the
            model, built with the usual arguments plus ``rpn_kwargs`` / ``roi_heads_kwargs``.
    """
    check_normalisation(cfg)
    if not 1 <= cfg.detections_per_img <= 1000:
        raise ValueError(f"model.detections_per_img must be in 1..1000, got {cfg.detections_per_img}")
    channels = backbone.out_channels
    heads = heads or default_roi_head_parts(channels, cfg.num_classes)
    anchors = build_anchor_generator(cfg)
    rpn = rpn_cls(
        anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=cfg.rpn_fg_iou, bg_iou_thresh=cfg.rpn_bg_iou,
        batch_size_per_image=cfg.rpn_batch_size_per_image, positive_fraction=cfg.rpn_positive_fraction,
        pre_nms_top_n={"training": cfg.rpn_pre_nms_top_n_train, "testing": cfg.rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": cfg.rpn_post_nms_top_n_train, "testing": cfg.rpn_post_nms_top_n_test},
        nms_thresh=cfg.rpn_nms_thresh, **(rpn_kwargs or {}),
    )
    roi_heads = roi_heads_cls(
        SparseRoIAlign(ROI_LEVELS, output_size=7, sampling_ratio=2), heads.box_head, heads.box_predictor,
        fg_iou_thresh=cfg.roi_fg_iou, bg_iou_thresh=cfg.roi_bg_iou,
        batch_size_per_image=cfg.roi_batch_size_per_image, positive_fraction=cfg.roi_positive_fraction,
        bbox_reg_weights=None, score_thresh=cfg.box_score_thresh, nms_thresh=cfg.box_nms_thresh,
        detections_per_img=cfg.detections_per_img,
        mask_roi_pool=SparseRoIAlign(ROI_LEVELS, output_size=14, sampling_ratio=2),
        mask_head=heads.mask_head, mask_predictor=heads.mask_predictor, **(roi_heads_kwargs or {}),
    )
    transform = CompactMaskTransform(cfg.min_size, cfg.max_size, cfg.image_mean, cfg.image_std)
    return model_cls(backbone, rpn, roi_heads, transform)


def check_normalisation(cfg: ModelConfig) -> None:
    """One mean and one positive std per band."""
    for key in ("image_mean", "image_std"):
        values = getattr(cfg, key)
        if len(values) != cfg.in_channels:
            raise ValueError(f"model.{key} has {len(values)} values but model.in_channels is {cfg.in_channels}")
    if any(s <= 0 for s in cfg.image_std):
        raise ValueError(f"model.image_std must be positive, got {cfg.image_std}")
