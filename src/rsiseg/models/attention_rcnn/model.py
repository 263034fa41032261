"""``maskrcnn_effb0_cbam``: the attention Mask R-CNN of the iSAID report.

EfficientNet-B0 with CBAM after C2-C5 and an FPN with CBAM on P2-P5
(:mod:`~rsiseg.models.attention_rcnn.backbone`), the RPN with the config's anchors (the report's
"stride adjusted" ones in ``configs/isaid_effb0_cbam.yaml``), a 2-FC box head with dropout and a
residual 4-conv mask head (:mod:`~rsiseg.models.attention_rcnn.heads`). Every new part (CBAM,
FPN, RPN, heads) starts from Kaiming-normal weights; the output layers from small normal ones.
Inputs and outputs follow the Mask R-CNN contract of :mod:`rsiseg.models.mask_rcnn`.
"""

from __future__ import annotations

from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from rsiseg.config import ModelConfig
from rsiseg.models.attention_rcnn.backbone import build_efficientnet_cbam_fpn
from rsiseg.models.attention_rcnn.heads import DropoutTwoMLPHead, ResidualMaskHead, init_output_layers, kaiming_init
from rsiseg.models.layers.rcnn_assembly import RoIHeadParts, assemble_mask_rcnn


def build_maskrcnn_effb0_cbam(cfg: ModelConfig) -> GeneralizedRCNN:
    """The report's model from ``cfg`` (common fields) and ``cfg.attention`` (the family's options)."""
    options = cfg.attention
    backbone = build_efficientnet_cbam_fpn(cfg)
    channels = backbone.out_channels
    classes = cfg.num_classes + 1
    heads = RoIHeadParts(
        DropoutTwoMLPHead(channels * 7 * 7, options.box_head_dim, options.box_dropout),
        FastRCNNPredictor(options.box_head_dim, classes),
        ResidualMaskHead(channels, channels, options.mask_convs),
        MaskRCNNPredictor(channels, channels, classes),
    )
    model = assemble_mask_rcnn(backbone, cfg, heads)
    for new_part in (backbone.body.cbam, backbone.fpn, model.rpn, model.roi_heads):
        kaiming_init(new_part)
    init_output_layers(model.roi_heads.box_predictor, model.roi_heads.mask_predictor.mask_fcn_logits, model.rpn.head)
    return model
