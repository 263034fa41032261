"""``yolact_r18`` / ``yolact_r50``: YOLACT (Bolya et al., ICCV 2019) and RELACT on the model contract.

ResNet + FPN P3-P7 (:func:`~rsiseg.models.backbones.resnet_fpn.build_resnet_fpn` with P6/P7 from P5),
a protonet on P3 (k prototypes at a quarter of the input), one prediction head shared across levels
(class logits, box deltas, k tanh coefficients), anchors from ``model.anchor_sizes`` (one list per level)
and ``model.anchor_ratios``, an auxiliary semantic head on P3. RELACT's two additions are switches of
``model.yolact``: ``phase.enabled`` (:class:`~rsiseg.models.layers.fourier.PhaseEnhancement` on chosen
levels) and ``sorting: quality`` (a mask-quality branch; detections ranked by confidence x quality).

Inputs and outputs follow the Mask R-CNN contract of :mod:`rsiseg.models.mask_rcnn`: ``images`` float
``[C, H, W]`` in [0, 1]; training ``targets`` with ``boxes``, ``labels`` and ``masks``
(:class:`~rsiseg.masks.InstanceMasks`) give the losses ``loss_conf``, ``loss_box``, ``loss_mask``,
``loss_semantic`` (when its weight is > 0) and ``loss_quality`` (with quality sorting); eval gives per
image ``boxes``, ``labels``, ``scores``, ``roi_masks`` ``[D, M, M]`` (mask probabilities inside each box)
and ``image_size``, at most ``detections_per_img`` (up to 1000).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from rsiseg.config import ModelConfig
from rsiseg.models.backbones.resnet_fpn import resnet_fpn_from_config
from rsiseg.models.layers.box_matching import LocalMatcher, match_boxes
from rsiseg.models.layers.fourier import PhaseEnhancement
from rsiseg.models.layers.rcnn_assembly import build_anchor_generator, check_normalisation
from rsiseg.models.layers.rcnn_transform import CompactMaskTransform
from rsiseg.models.yolact.heads import HeadOutputs, PredictionHead, ProtoNet, SemanticHead
from rsiseg.models.yolact.losses import AnchorTargets, box_loss, class_loss, mask_losses, semantic_loss
from rsiseg.models.yolact.masks import assemble_roi_logits
from rsiseg.models.yolact.postprocess import select_detections

LEVELS = 5  # P3-P7
FIRST_LEVEL = 3


class Yolact(nn.Module):
    """YOLACT with RELACT's switches, built from a :class:`~rsiseg.config.ModelConfig`.

    Args:
        backbone: maps ``[B, C, H, W]`` to the five levels P3-P7 (in that order) of ``out_channels`` channels.
        cfg: common fields (classes, normalisation, resize, anchors, score and NMS thresholds, the
            detection cap) and ``cfg.yolact``.
    """

    def __init__(self, backbone: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        check_normalisation(cfg)
        options = cfg.yolact
        channels = backbone.out_channels
        self.cfg = cfg
        self.transform = CompactMaskTransform(cfg.min_size, cfg.max_size, cfg.image_mean, cfg.image_std)
        self.backbone = backbone
        phase = options.phase
        self.phase = nn.ModuleDict({
            f"p{level}": PhaseEnhancement(channels, phase.amplitude, phase.kernel, phase.gate) for level in phase.levels
        }) if phase.enabled else None
        self.anchor_generator = build_anchor_generator(cfg, LEVELS)
        anchors = self.anchor_generator.num_anchors_per_location()[0]
        self.protonet = ProtoNet(channels, options.num_prototypes)
        self.head = PredictionHead(channels, options.head_channels, anchors, cfg.num_classes, options.num_prototypes,
                                   quality=options.sorting == "quality")
        self.semantic_head = SemanticHead(channels, cfg.num_classes) if options.semantic_weight > 0 else None
        self.box_coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0), bbox_xform_clip=math.log(1000.0 / 16))
        self.matcher = LocalMatcher(options.pos_iou, options.neg_iou, allow_low_quality_matches=True)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """Losses (training) or detections (eval); see the module docstring."""
        if self.training and targets is None:
            raise ValueError("in training mode the model needs targets")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets)
        levels = self.features(batch.tensors)
        prototypes = self.protonet(levels[0])
        outputs = self.head(levels)
        anchors = self.anchor_generator(batch, levels)[0]  # the same for every image of the batch
        if self.training:
            return self.losses(batch, levels, prototypes, outputs, anchors, targets)
        detections = [self.detect(outputs, b, prototypes[b], anchors, batch) for b in range(len(images))]
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def features(self, tensors: Tensor) -> list[Tensor]:
        """``[B, C, H, W]`` network input -> P3-P7, phase-enhanced where configured."""
        levels = list(self.backbone(tensors).values())
        if self.phase is None:
            return levels
        return [self.phase[f"p{i + FIRST_LEVEL}"](x) if f"p{i + FIRST_LEVEL}" in self.phase else x
                for i, x in enumerate(levels)]

    def assign(self, anchors: Tensor, targets: list[dict[str, Tensor]]) -> AnchorTargets:
        """Match anchors to ground truth: IoU >= ``pos_iou`` positive, < ``neg_iou`` negative, and every
        instance's best anchors positive (ties included) so no object is left unmatched."""
        pairs = [match_boxes(self.matcher, anchors, t["boxes"], t["labels"]) for t in targets]
        return AnchorTargets(torch.stack([labels for _, labels in pairs]), torch.stack([m for m, _ in pairs]))

    def losses(self, batch: ImageList, levels: list[Tensor], prototypes: Tensor, outputs: HeadOutputs,
               anchors: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        options = self.cfg.yolact
        assigned = self.assign(anchors, targets)
        positive = assigned.labels > 0
        count = positive.sum().clamp(min=1)
        truth = torch.cat([t["boxes"][m[p]] for t, m, p in zip(targets, assigned.matched, positive)])
        target_deltas = self.box_coder.encode_single(truth, anchors[None].expand(len(targets), -1, -1)[positive])
        scale = prototypes.shape[-1] / batch.tensors.shape[-1]
        masks = mask_losses(prototypes, outputs.coefficients, outputs.quality, assigned, targets, scale,
                            options.mask_size, options.masks_per_image)
        losses = {
            "loss_conf": options.conf_weight * class_loss(outputs.logits, assigned.labels, options.negpos_ratio) / count,
            "loss_box": options.box_weight * box_loss(outputs.deltas[positive], target_deltas) / count,
            "loss_mask": options.mask_weight * masks.mask,
        }
        if self.semantic_head is not None:
            stride = batch.tensors.shape[-1] / levels[0].shape[-1]
            losses["loss_semantic"] = options.semantic_weight * semantic_loss(self.semantic_head(levels[0]), targets,
                                                                              stride)
        if masks.quality is not None:
            losses["loss_quality"] = options.quality_weight * masks.quality
        return losses

    def detect(self, outputs: HeadOutputs, b: int, prototypes: Tensor, anchors: Tensor,
               batch: ImageList) -> dict[str, Tensor]:
        """Image ``b``'s detections in network-input pixels with their ``[D, M, M]`` mask probabilities."""
        height, width = batch.image_sizes[b]
        probs = outputs.logits[b].softmax(dim=-1)[:, 1:]
        rank = probs if outputs.quality is None else probs * outputs.quality[b].sigmoid()[:, None]
        boxes = self.box_coder.decode_single(outputs.deltas[b], anchors)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        kept = select_detections(probs, rank, boxes, self.cfg.box_score_thresh, self.cfg.box_nms_thresh,
                                 self.cfg.yolact.pre_nms_top_k, self.cfg.detections_per_img)
        boxes = boxes[kept.anchors]
        scale = prototypes.shape[-1] / batch.tensors.shape[-1]
        logits = assemble_roi_logits(prototypes, outputs.coefficients[b, kept.anchors], boxes, scale,
                                     self.cfg.yolact.mask_size)
        return {"boxes": boxes, "labels": kept.labels, "scores": kept.scores, "roi_masks": logits.sigmoid()}


def build_yolact(cfg: ModelConfig, depth_name: str) -> Yolact:
    """YOLACT (RELACT with the switches on) on a ResNet of ``depth_name``."""
    if not 1 <= cfg.detections_per_img <= 1000:
        raise ValueError(f"model.detections_per_img must be in 1..1000, got {cfg.detections_per_img}")
    backbone = resnet_fpn_from_config(cfg, depth_name, first_stage=2,
                                      extra_blocks=LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels))
    return Yolact(backbone, cfg)


def build_yolact_r18(cfg: ModelConfig) -> Yolact:
    """YOLACT / RELACT with a ResNet-18 (tests and the CPU demo)."""
    return build_yolact(cfg, "resnet18")


def build_yolact_r50(cfg: ModelConfig) -> Yolact:
    """YOLACT / RELACT with a ResNet-50 (the paper's)."""
    return build_yolact(cfg, "resnet50")
