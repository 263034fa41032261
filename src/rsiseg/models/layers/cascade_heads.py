"""Cascade R-CNN box stages on the compact-mask RoI heads (Cai and Vasconcelos, 2018).

A sequence of box stages, each with its own box head, class-agnostic box predictor, box coder and
foreground IoU (``model.cascade``: 0.5, 0.6, 0.7 by default). Stage t+1 starts from stage t's
regressed boxes, so later stages see better-localised RoIs and are trained with a stricter IoU.

- **Training** (as mmdetection's ``CascadeRoIHead``): every stage adds the ground-truth boxes to
  its input boxes, matches them with its IoU (foreground at or above, background below, no
  low-quality matches), samples them again and encodes regression targets with its own box
  weights. Each stage's classification and box losses are scaled by its loss weight. The mask
  branch trains on the last stage's sampled positive RoIs.
- **Eval** (as detectron2's ``CascadeROIHeads``): the stages run in sequence, each on the boxes
  regressed by the one before; the class scores are the mean of the stages' softmax scores, each
  stage scoring its own input boxes; the boxes are the last stage's regression. Post-processing
  is torchvision's, with each box standing for every class.

The mask branch and the ``prompter`` / ``mask_rois`` hooks are those of
:class:`~rsiseg.models.layers.roi_heads.CompactMaskRoIHeads`; the prompter sees the pooled box
features of every stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import boxes as box_ops

from rsiseg.config import CascadeConfig, ModelConfig
from rsiseg.models.layers.box_matching import LocalMatcher, match_boxes
from rsiseg.models.layers.mask_targets import mask_rcnn_loss
from rsiseg.models.layers.rcnn_assembly import RoIHeadParts, default_roi_head_parts
from rsiseg.models.layers.roi_heads import CompactMaskRoIHeads, apply_prompter


class AgnosticBoxPredictor(nn.Module):
    """Class logits and one class-agnostic box regression per RoI.

    Maps ``[K, D]`` (or ``[K, D, 1, 1]``) features to class logits ``[K, num_classes]`` (background
    first) and box deltas ``[K, 4]``. Initialised as torchvision's ``FastRCNNPredictor``.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class CascadeStage(nn.Module):
    """One box stage: its heads, its matcher (foreground IoU ``iou``), box coder and loss weight."""

    def __init__(
        self, box_head: nn.Module, box_predictor: nn.Module, iou: float, box_weights: Sequence[float],
        loss_weight: float,
    ) -> None:
        super().__init__()
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.proposal_matcher = LocalMatcher(iou, iou, allow_low_quality_matches=False)
        self.box_coder = BoxCoder(tuple(float(w) for w in box_weights))
        self.loss_weight = float(loss_weight)


class StageSamples(NamedTuple):
    """One stage's training RoIs, per image: ``boxes`` ``[K_i, 4]`` xyxy, ``matched`` instance index
    int64 ``[K_i]``, ``labels`` int64 ``[K_i]`` (0 background), ``regression_targets`` ``[K_i, 4]``
    and ``is_gt`` bool ``[K_i]`` (the RoI is a ground-truth box added to the proposals)."""

    boxes: list[Tensor]
    matched: list[Tensor]
    labels: list[Tensor]
    regression_targets: list[Tensor]
    is_gt: list[Tensor]


def cascade_stage_heads(
    first_box_head: TwoMLPHead, num_classes: int, num_stages: int,
) -> list[tuple[nn.Module, nn.Module]]:
    """Box head and class-agnostic predictor per stage: ``first_box_head`` for stage 0 (for instance
    :func:`~rsiseg.models.layers.rcnn_assembly.default_roi_head_parts`'s), new 2-FC heads of the
    same shape for the others.

    Args:
        num_classes: object classes, background excluded.
    """
    in_features, box_dim = first_box_head.fc6.in_features, first_box_head.fc7.out_features
    heads = [first_box_head] + [TwoMLPHead(in_features, box_dim) for _ in range(num_stages - 1)]
    return [(head, AgnosticBoxPredictor(box_dim, num_classes + 1)) for head in heads]


def cascade_roi_heads_parts(channels: int, cfg: ModelConfig) -> tuple[RoIHeadParts, dict[str, Any]]:
    """The heads and ``roi_heads_kwargs`` that make :func:`~rsiseg.models.layers.rcnn_assembly.assemble_mask_rcnn`
    build :class:`CascadeMaskRoIHeads` (pass ``roi_heads_cls=CascadeMaskRoIHeads``): torchvision's mask head and,
    per stage of ``cfg.cascade``, a 2-FC box head with a class-agnostic predictor, on ``channels``-channel features."""
    defaults = ModelConfig()
    for key in ("roi_fg_iou", "roi_bg_iou"):
        if getattr(cfg, key) != getattr(defaults, key):
            raise ValueError(f"model.{key} is {getattr(cfg, key)}, but Cascade's stages have their own IoUs: set "
                             f"model.cascade.stage_ious (now {list(cfg.cascade.stage_ious)}) instead")
    heads = default_roi_head_parts(channels, cfg.num_classes)  # its box head becomes stage 1's
    stage_heads = cascade_stage_heads(heads.box_head, cfg.num_classes, len(cfg.cascade.stage_ious))
    return heads, {"stage_heads": stage_heads, "cascade": cfg.cascade}


def check_cascade_config(cascade: CascadeConfig, num_stage_heads: int) -> None:
    """One IoU, one set of box weights, one loss weight and one head pair per stage, at least one stage."""
    stages = len(cascade.stage_ious)
    if stages < 1:
        raise ValueError("model.cascade.stage_ious needs at least one stage")
    for key in ("stage_box_weights", "stage_loss_weights"):
        count = len(getattr(cascade, key))
        if count != stages:
            raise ValueError(f"model.cascade.{key} has {count} entries but model.cascade.stage_ious has {stages} "
                             f"(one per stage)")
    if num_stage_heads != stages:
        raise ValueError(f"{num_stage_heads} stage heads were given but model.cascade.stage_ious has {stages} stages")


def mean_stage_probs(logits: list[Tensor]) -> Tensor:
    """The cascade's class probabilities: the mean over the stages of each stage's softmax ``[K, num_classes + 1]``."""
    return torch.stack([stage_logits.softmax(-1) for stage_logits in logits]).mean(0)


def stage_box_loss(
    class_logits: Tensor, deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """torchvision's ``fastrcnn_loss`` for class-agnostic deltas ``[K, 4]``: cross-entropy, and
    smooth L1 (beta 1/9) summed over the positive RoIs and divided by the number of sampled RoIs."""
    labels_all = torch.cat(labels)
    targets = torch.cat(regression_targets)
    if labels_all.numel() == 0:  # nothing sampled: zero, still attached to the graph
        zero = class_logits.sum() * 0 + deltas.sum() * 0
        return zero, zero
    loss_classifier = F.cross_entropy(class_logits, labels_all)
    positive = labels_all > 0
    loss_box = F.smooth_l1_loss(deltas[positive], targets[positive], beta=1 / 9, reduction="sum")
    return loss_classifier, loss_box / labels_all.numel()


class CascadeMaskRoIHeads(CompactMaskRoIHeads):
    """Cascade box stages with the compact mask branch of :class:`CompactMaskRoIHeads`.

    Output per image in eval, as :class:`CompactMaskRoIHeads`: ``boxes`` float ``[D, 4]`` xyxy,
    ``labels`` int64 ``[D]``, ``scores`` float ``[D]`` in [0, 1] (the mean of the stages' softmax),
    ``roi_masks`` float ``[D, M, M]``. Training losses: ``loss_classifier_s1``, ``loss_box_reg_s1``,
    ... one pair per stage (already scaled by its loss weight) and ``loss_mask``.

    Parameters: ``stages.{t}.box_head.*`` and ``stages.{t}.box_predictor.*`` per stage, then the
    usual ``mask_head.*`` and ``mask_predictor.*``.

    Args:
        box_roi_pool: as torchvision's :class:`RoIHeads`, pooling ``[K, C, 7, 7]`` for every stage.
        box_head, box_predictor: not used: the stages' replace them (the assembly passes them
            positionally). The heads have no ``box_head``, ``box_predictor``, ``box_coder`` or
            ``proposal_matcher`` of their own.
        stage_heads: per stage ``(box head, box predictor)``: the head maps ``[K, C, 7, 7]`` to
            ``[K, D]``, the predictor that to class logits ``[K, num_classes + 1]`` and class-agnostic
            deltas ``[K, 4]`` (:class:`AgnosticBoxPredictor`).
        cascade: per-stage IoUs, box-coder weights and loss weights; they replace the RoIHeads
            arguments ``fg_iou_thresh``, ``bg_iou_thresh`` and ``bbox_reg_weights``.
        Everything else as :class:`CompactMaskRoIHeads` (sampling, score and NMS thresholds,
        detections per image, mask branch, ``prompter``, ``mask_rois``).
    """

    def __init__(
        self, box_roi_pool: nn.Module, box_head: nn.Module | None, box_predictor: nn.Module | None, *args: Any,
        stage_heads: Sequence[tuple[nn.Module, nn.Module]], cascade: CascadeConfig, **kwargs: Any,
    ) -> None:
        check_cascade_config(cascade, len(stage_heads))
        super().__init__(box_roi_pool, None, None, *args, **kwargs)
        # One box head, box coder and matcher would be wrong here: the single-stage paths fail loudly instead.
        del self.box_head, self.box_predictor, self.box_coder, self.proposal_matcher, self.box_similarity
        self.stages = nn.ModuleList(
            CascadeStage(head, predictor, iou, weights, loss_weight)
            for (head, predictor), iou, weights, loss_weight in zip(
                stage_heads, cascade.stage_ious, cascade.stage_box_weights, cascade.stage_loss_weights)
        )

    def forward(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None, prompt_context: Any = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training mode")
            self.check_targets(targets)
            return [], self.training_losses(features, proposals, image_shapes, targets, prompt_context)
        boxes, logits = self.run_stages(features, proposals, image_shapes, prompt_context)
        boxes, scores, labels = self.select_detections(boxes, mean_stage_probs(logits), image_shapes)
        return self.detections(features, boxes, scores, labels, image_shapes, prompt_context), {}

    def training_losses(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]], prompt_context: Any = None,
    ) -> dict[str, Tensor]:
        """Each stage's weighted box losses (``loss_classifier_s{t}``, ``loss_box_reg_s{t}``) and the
        mask loss on the last stage's positive RoIs."""
        losses = {}
        for index, stage in enumerate(self.stages):
            samples = self.select_stage_samples(index, proposals, targets)
            box_features = self.box_features(features, samples.boxes, image_shapes, prompt_context, stage=index)
            class_logits, deltas = stage.box_predictor(box_features)
            loss_classifier, loss_box_reg = stage_box_loss(
                class_logits, deltas, samples.labels, samples.regression_targets)
            losses[f"loss_classifier_s{index + 1}"] = loss_classifier * stage.loss_weight
            losses[f"loss_box_reg_s{index + 1}"] = loss_box_reg * stage.loss_weight
            if index + 1 < len(self.stages):
                proposals = self.next_training_proposals(stage, deltas, samples, image_shapes)
        rois, matched = self.positive_rois(samples.boxes, samples.matched, samples.labels, targets)
        logits = self.mask_logits(features, rois, image_shapes, prompt_context)
        losses["loss_mask"] = mask_rcnn_loss(logits, rois, matched, targets)
        return losses

    def select_stage_samples(
        self, index: int, proposals: list[Tensor], targets: list[dict[str, Tensor]],
    ) -> StageSamples:
        """Stage ``index``'s training RoIs from its input boxes (per image ``[P_i, 4]``): the
        ground-truth boxes are added, every box is matched with the stage's IoU, a balanced
        sample is drawn and its regression targets are encoded with the stage's box coder."""
        stage = self.stages[index]
        gt_boxes = [t["boxes"].to(p.dtype) for t, p in zip(targets, proposals)]
        counts = [len(p) for p in proposals]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched, labels = [], []
        for boxes, gt, target in zip(proposals, gt_boxes, targets):
            image_matched, image_labels = match_boxes(stage.proposal_matcher, boxes, gt, target["labels"])
            matched.append(image_matched)
            labels.append(image_labels)
        sampled = self.subsample(labels)
        boxes = [p[i] for p, i in zip(proposals, sampled)]
        matched = [m[i] for m, i in zip(matched, sampled)]
        labels = [lab[i] for lab, i in zip(labels, sampled)]
        is_gt = [i >= count for i, count in zip(sampled, counts)]
        # Without instances every RoI is background and its (unused) targets are zeros.
        matched_gt = [gt[m] if len(gt) else b for gt, m, b in zip(gt_boxes, matched, boxes)]
        regression_targets = list(stage.box_coder.encode(matched_gt, boxes))
        return StageSamples(boxes, matched, labels, regression_targets, is_gt)

    def next_training_proposals(
        self, stage: CascadeStage, deltas: Tensor, samples: StageSamples, image_shapes: list[tuple[int, int]],
    ) -> list[Tensor]:
        """The next stage's input boxes: this stage's regression of its sampled RoIs, less those that
        were ground-truth boxes (the next stage adds them again) and those clipped to nothing."""
        refined = self.refine_boxes(stage, deltas, samples.boxes, image_shapes)
        out = []
        for boxes, is_gt in zip(refined, samples.is_gt):
            keep = ~is_gt & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            out.append(boxes[keep])
        return out

    @staticmethod
    def refine_boxes(
        stage: CascadeStage, deltas: Tensor, boxes: list[Tensor], image_shapes: list[tuple[int, int]],
    ) -> list[Tensor]:
        """Per image ``[K_i, 4]``: ``boxes`` moved by the stage's ``deltas`` ``[sum K_i, 4]``
        (detached: no gradient flows from one stage into the one before), clipped to the image."""
        concat = torch.cat(boxes)
        # Deltas in the boxes' dtype: decoding in float16 (autocast) would round coordinates to ~0.5 px.
        decoded = stage.box_coder.decode_single(deltas.detach().to(concat.dtype), concat)
        return [box_ops.clip_boxes_to_image(b, shape)
                for b, shape in zip(decoded.split([len(b) for b in boxes]), image_shapes)]

    def run_stages(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]],
        prompt_context: Any = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Eval cascade on per-image boxes ``[K_i, 4]``: the last stage's boxes (per image
        ``[K_i, 4]``) and each stage's class logits ``[sum K_i, num_classes + 1]``, each stage
        scoring its own input boxes."""
        logits = []
        for index, stage in enumerate(self.stages):
            box_features = self.box_features(features, boxes, image_shapes, prompt_context, stage=index)
            class_logits, deltas = stage.box_predictor(box_features)
            logits.append(class_logits)
            boxes = self.refine_boxes(stage, deltas, boxes, image_shapes)
        return boxes, logits

    def select_detections(
        self, boxes: list[Tensor], probs: Tensor, image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """torchvision's ``postprocess_detections`` for class-agnostic boxes.

        Each box stands for every object class: pairs scoring above ``score_thresh`` on boxes of
        side above 0.01 px go through per-class NMS, and the ``detections_per_img`` best are kept.

        Args:
            boxes: per image ``[K_i, 4]`` xyxy.
            probs: ``[sum K_i, num_classes + 1]`` class probabilities, background first.

        Returns:
            Per image boxes ``[D_i, 4]``, scores ``[D_i]`` and labels int64 ``[D_i]`` (1..num_classes).
        """
        all_boxes, all_scores, all_labels = [], [], []
        for image_boxes, image_probs, shape in zip(boxes, probs.split([len(b) for b in boxes]), image_shapes):
            image_boxes = box_ops.clip_boxes_to_image(image_boxes, shape)
            scores = image_probs[:, 1:]
            valid = torch.zeros_like(scores, dtype=torch.bool)
            valid[box_ops.remove_small_boxes(image_boxes, min_size=1e-2)] = True
            # Row-major (box, class) order, as torchvision's flattened per-class boxes, so NMS ties match.
            box_index, class_index = torch.nonzero(valid & (scores > self.score_thresh), as_tuple=True)
            image_boxes, scores, labels = image_boxes[box_index], scores[box_index, class_index], class_index + 1
            keep = box_ops.batched_nms(image_boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(image_boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels

    def box_features(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]],
        prompt_context: Any = None, stage: int = -1,
    ) -> Tensor:
        """``[sum K_i, D]`` features of the given boxes (per image ``[K_i, 4]``) from stage ``stage``'s
        box head (the last stage's by default), after the prompter."""
        pooled = self.box_roi_pool(features, boxes, image_shapes)
        return self.stages[stage].box_head(apply_prompter(self.prompter, "box", pooled, boxes, prompt_context))

    def box_class_probs(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]],
        prompt_context: Any = None,
    ) -> Tensor:
        """``[sum K_i, num_classes + 1]`` class probabilities of given boxes (for box prompts), background
        first: the cascade's mean over the stages, the first stage scoring the given boxes."""
        return mean_stage_probs(self.run_stages(features, boxes, image_shapes, prompt_context)[1])

    def box_class_logits(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]],
        prompt_context: Any = None,
    ) -> Tensor:
        """``[sum K_i, num_classes + 1]`` differentiable class scores of given boxes (for Grad-CAM):
        the mean of the stages' pre-softmax logits."""
        return torch.stack(self.run_stages(features, boxes, image_shapes, prompt_context)[1]).mean(0)
