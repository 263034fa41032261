"""Box and mask RoI heads whose mask branch works on compact instance masks.

The box branch is torchvision's (sampling, box head, losses, post-processing), with proposals
matched to instances without an ``M x P`` IoU matrix. The mask branch differs in two ways: training targets are sampled per positive RoI from
:class:`~rsiseg.masks.InstanceMasks` (:func:`~rsiseg.models.layers.mask_targets.mask_rcnn_loss`),
and in eval the ``M x M`` mask probabilities are returned per box as ``roi_masks`` instead of
being pasted into full-size images (1,000 detections on an 800 px image would take 2.5 GB).

A family may give the heads a ``prompter`` (:class:`RoIPrompter`): a module that adds prompts to
the pooled RoI features before the box and mask heads. Without one, or without a
``prompt_context``, the heads are torchvision's exactly.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference

from rsiseg.models.layers.box_matching import match_boxes, use_local_matching
from rsiseg.models.layers.mask_targets import mask_rcnn_loss

# Detections whose masks are computed at once in eval.
_EVAL_MASK_CHUNK = 500


class RoIPrompter(Protocol):
    """Adds prompts to pooled RoI features: ``(kind, features, boxes, context) -> features``.

    ``kind`` is ``"box"`` (7x7 features) or ``"mask"`` (14x14); ``features`` is ``[K, C, S, S]``
    for the boxes of all images in order, ``boxes`` per image ``[K_i, 4]`` xyxy in network-input
    pixels, ``context`` whatever the model encoded from the batch's images (for instance the
    normalised image tensor and global tokens). Returns ``[K, C, S, S]``.
    """

    def __call__(self, kind: str, features: Tensor, boxes: list[Tensor], context: Any) -> Tensor: ...


def apply_prompter(
    prompter: nn.Module | None, kind: str, features: Tensor, boxes: list[Tensor], context: Any,
) -> Tensor:
    """``prompter(kind, features, boxes, context)``, or ``features`` unchanged without a prompter or context."""
    if prompter is None or context is None:
        return features
    return prompter(kind, features, boxes, context)


class CompactMaskRoIHeads(RoIHeads):
    """torchvision's :class:`RoIHeads` (same arguments and weights) with a compact mask branch.

    Eval output per image: ``boxes`` float ``[N, 4]`` xyxy (network-input pixels until the
    transform maps them back), ``labels`` int64 ``[N]``, ``scores`` float ``[N]`` and
    ``roi_masks`` float ``[N, M, M]``: the mask probability of the predicted class inside each box.
    Proposals are matched to instances chunk by chunk (:mod:`~rsiseg.models.layers.box_matching`).

    Args:
        prompter: an optional :class:`RoIPrompter` module (its parameters join the heads').
        mask_rois: an optional callable ``(rois, matched, targets) -> (rois, matched)`` that adds
            training RoIs to the mask branch (for instance jittered ground-truth boxes as prompts).
        Everything else as torchvision's :class:`RoIHeads`.
    """

    def __init__(self, *args: Any, prompter: nn.Module | None = None, mask_rois: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        use_local_matching(self)
        self.prompter = prompter
        self.extra_mask_rois = mask_rois

    def forward(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None, prompt_context: Any = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training mode")
            proposals, matched, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_features(features, proposals, image_shapes, prompt_context)
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            rois, matched = self.positive_rois(proposals, matched, labels, targets)
            logits = self.mask_logits(features, rois, image_shapes, prompt_context)
            loss_mask = mask_rcnn_loss(logits, rois, matched, targets)
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        return self.detections(features, boxes, scores, labels, image_shapes, prompt_context), {}

    def detections(
        self, features: dict[str, Tensor], boxes: list[Tensor], scores: list[Tensor], labels: list[Tensor],
        image_shapes: list[tuple[int, int]], prompt_context: Any = None,
    ) -> list[dict[str, Tensor]]:
        """The eval output: per image the kept ``boxes`` ``[D_i, 4]``, ``labels``, ``scores`` and their
        ``roi_masks`` ``[D_i, M, M]`` from the mask branch."""
        probs = self.mask_probs(features, boxes, labels, image_shapes, prompt_context)
        return [
            {"boxes": b, "labels": lab, "scores": s, "roi_masks": p}
            for b, lab, s, p in zip(boxes, labels, scores, probs)
        ]

    def box_features(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]],
        prompt_context: Any = None,
    ) -> Tensor:
        """``[sum K_i, box_dim]`` box-head features of the given boxes (per image ``[K_i, 4]``)."""
        pooled = self.box_roi_pool(features, boxes, image_shapes)
        return self.box_head(apply_prompter(self.prompter, "box", pooled, boxes, prompt_context))

    def box_class_probs(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]],
        prompt_context: Any = None,
    ) -> Tensor:
        """``[sum K_i, num_classes + 1]`` class probabilities of given boxes (for box prompts), background first."""
        return self.box_class_logits(features, boxes, image_shapes, prompt_context).softmax(-1)

    def box_class_logits(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]],
        prompt_context: Any = None,
    ) -> Tensor:
        """``[sum K_i, num_classes + 1]`` pre-softmax class scores of given boxes (differentiable, for Grad-CAM)."""
        return self.box_predictor(self.box_features(features, boxes, image_shapes, prompt_context))[0]

    def positive_rois(
        self, proposals: list[Tensor], matched: list[Tensor], labels: list[Tensor], targets: list[dict[str, Tensor]],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The mask branch's training RoIs: the positive proposals per image ``[P_i, 4]`` with their
        matched instance ``[P_i]``, plus whatever ``mask_rois`` adds."""
        positive = [torch.where(image_labels > 0)[0] for image_labels in labels]
        rois = [p[i] for p, i in zip(proposals, positive)]
        matched = [m[i] for m, i in zip(matched, positive)]
        if self.extra_mask_rois is not None:
            rois, matched = self.extra_mask_rois(rois, matched, targets)
        return rois, matched

    def mask_probs(
        self, features: dict[str, Tensor], boxes: list[Tensor], labels: list[Tensor],
        image_shapes: list[tuple[int, int]], prompt_context: Any = None,
    ) -> list[Tensor]:
        """Per image ``[D_i, M, M]`` mask probabilities of each detection's class, in chunks of RoIs.

        Chunking bounds the mask head's activations: 8 images x 1000 detections in one pass would
        hold ``8000 x C x 28 x 28`` floats (1.6 GB for C = 64) in the upsampling layer alone.
        """
        out = []
        for i, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
            chunks = []
            for start in range(0, max(len(image_boxes), 1), _EVAL_MASK_CHUNK):
                part = slice(start, start + _EVAL_MASK_CHUNK)
                rois = [image_boxes[part] if j == i else image_boxes[:0] for j in range(len(boxes))]
                logits = self.mask_logits(features, rois, image_shapes, prompt_context)
                chunks.append(maskrcnn_inference(logits, [image_labels[part]])[0][:, 0])
            out.append(torch.cat(chunks))
        return out

    def assign_targets_to_proposals(
        self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's assignment (matched instance and label per proposal; -1 ignores, 0 is
        background), with the matcher fed lazily so that no ``M x P`` IoU matrix is made."""
        matched_idxs, labels = [], []
        for boxes, gt, classes in zip(proposals, gt_boxes, gt_labels):
            matched, image_labels = match_boxes(self.proposal_matcher, boxes, gt, classes)
            matched_idxs.append(matched)
            labels.append(image_labels)
        return matched_idxs, labels

    def mask_logits(
        self, features: dict[str, Tensor], rois: list[Tensor], image_shapes: list[tuple[int, int]],
        prompt_context: Any = None,
    ) -> Tensor:
        """``[sum K_i, num_classes + 1, M, M]`` mask logits of the given boxes (per image ``[K_i, 4]``)."""
        pooled = self.mask_roi_pool(features, rois, image_shapes)
        return self.mask_predictor(self.mask_head(apply_prompter(self.prompter, "mask", pooled, rois, prompt_context)))
