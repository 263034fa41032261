"""Cascade Mask R-CNN (ResNet-18/50 + FPN): three box stages of rising IoU, then the mask head.

Assembled by :func:`~rsiseg.models.layers.rcnn_assembly.assemble_mask_rcnn` with
:class:`~rsiseg.models.layers.cascade_heads.CascadeMaskRoIHeads`: per stage a 2-FC box head and a
class-agnostic box predictor, the stages' IoUs, box weights and loss weights from ``model.cascade``
(:class:`~rsiseg.config.CascadeConfig`); torchvision's 4-conv mask head. Inputs and outputs follow
the Mask R-CNN contract of :mod:`rsiseg.models.mask_rcnn`; the training losses are
``loss_classifier_s1``, ``loss_box_reg_s1``, ... per stage, ``loss_mask``, ``loss_objectness``
and ``loss_rpn_box_reg``.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from rsiseg.config import ModelConfig
from rsiseg.models.backbones.resnet_fpn import resnet_fpn_from_config
from rsiseg.models.layers.cascade_heads import CascadeMaskRoIHeads, cascade_roi_heads_parts
from rsiseg.models.layers.rcnn_assembly import assemble_mask_rcnn


def assemble_cascade_mask_rcnn(backbone: nn.Module, cfg: ModelConfig) -> GeneralizedRCNN:
    """Cascade Mask R-CNN on a backbone as :func:`~rsiseg.models.layers.rcnn_assembly.assemble_mask_rcnn` takes."""
    heads, roi_kwargs = cascade_roi_heads_parts(backbone.out_channels, cfg)
    return assemble_mask_rcnn(backbone, cfg, heads, roi_heads_cls=CascadeMaskRoIHeads, roi_heads_kwargs=roi_kwargs)


def build_cascade_maskrcnn_r18_fpn(cfg: ModelConfig) -> GeneralizedRCNN:
    """Cascade Mask R-CNN with a ResNet-18 FPN backbone."""
    return assemble_cascade_mask_rcnn(resnet_fpn_from_config(cfg, "resnet18"), cfg)


def build_cascade_maskrcnn_r50_fpn(cfg: ModelConfig) -> GeneralizedRCNN:
    """Cascade Mask R-CNN with a ResNet-50 FPN backbone."""
    return assemble_cascade_mask_rcnn(resnet_fpn_from_config(cfg, "resnet50"), cfg)
