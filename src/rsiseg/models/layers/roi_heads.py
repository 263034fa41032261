"""Box and mask RoI heads whose mask branch works on compact instance masks.

The box branch is torchvision's (sampling, box head, losses, post-processing), with proposals
matched to instances without an ``M x P`` IoU matrix. The mask branch differs in two ways: training targets are sampled per positive RoI from
:class:`~rsiseg.masks.InstanceMasks` (:func:`~rsiseg.models.layers.mask_targets.mask_rcnn_loss`),
and in eval the ``M x M`` mask probabilities are returned per box as ``roi_masks`` instead of
being pasted into full-size images (1,000 detections on an 800 px image would take 2.5 GB).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference

from rsiseg.models.layers.box_matching import BoxPairs, use_local_matching
from rsiseg.models.layers.mask_targets import mask_rcnn_loss

# Detections whose masks are computed at once in eval.
_EVAL_MASK_CHUNK = 500


class CompactMaskRoIHeads(RoIHeads):
    """torchvision's :class:`RoIHeads` (same arguments and weights) with a compact mask branch.

    Eval output per image: ``boxes`` float ``[N, 4]`` xyxy (network-input pixels until the
    transform maps them back), ``labels`` int64 ``[N]``, ``scores`` float ``[N]`` and
    ``roi_masks`` float ``[N, M, M]``: the mask probability of the predicted class inside each box.
    Proposals are matched to instances chunk by chunk (:mod:`~rsiseg.models.layers.box_matching`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        use_local_matching(self)

    def forward(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training mode")
            proposals, matched, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            positive = [torch.where(image_labels > 0)[0] for image_labels in labels]
            rois = [p[i] for p, i in zip(proposals, positive)]
            matched = [m[i] for m, i in zip(matched, positive)]
            loss_mask = mask_rcnn_loss(self.mask_logits(features, rois, image_shapes), rois, matched, targets)
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        probs = self.mask_probs(features, boxes, labels, image_shapes)
        return [
            {"boxes": b, "labels": lab, "scores": s, "roi_masks": p}
            for b, lab, s, p in zip(boxes, labels, scores, probs)
        ], {}

    def mask_probs(
        self, features: dict[str, Tensor], boxes: list[Tensor], labels: list[Tensor],
        image_shapes: list[tuple[int, int]],
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
                logits = self.mask_logits(features, rois, image_shapes)
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
            if gt.numel() == 0:
                matched = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
                image_labels = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
            else:
                matches = self.proposal_matcher(BoxPairs(gt, boxes))
                matched = matches.clamp(min=0)
                image_labels = classes[matched].to(torch.int64)
                image_labels[matches == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0
                image_labels[matches == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1
            matched_idxs.append(matched)
            labels.append(image_labels)
        return matched_idxs, labels

    def mask_logits(self, features: dict[str, Tensor], rois: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """``[sum K_i, num_classes + 1, M, M]`` mask logits of the given boxes (per image ``[K_i, 4]``)."""
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, rois, image_shapes)))
