"""The proposals' area loss (PAreaLoss) of Insight Any Instance, and the RPN that adds it.

Each RPN proposal is matched to its best-IoU ground-truth box; over the proposals whose best IoU
is above a floor, the loss is the mean of ``((area_p - area_gt) / (area_gt + eps))^2``. It pushes
the RPN's box sizes towards the instances' sizes, which the smooth-L1 on log-size deltas weighs
the same for a 10 px ship and a 400 px harbour.

Which proposals: the RPN's torchvision code detaches the proposals it passes on, so the loss is
taken on the same boxes before that: the decoded predictions at every positive anchor (an anchor
the RPN's own matcher labels foreground). These are the proposals the RPN is trained to produce;
each is then matched afresh to its best-IoU box among all of its image's ground truth.

The floor (``model.prompt.parea_iou_floor``, default 0.5): below it a proposal has no clear
instance to size itself on (it straddles two, or sits on a fragment), and the relative area error
against an arbitrary box would dominate the mean. ``eps`` (1 px²) only guards degenerate boxes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_area, box_iou

from rsiseg.models.layers.box_matching import DenseRegionProposalNetwork

# IoU values computed at once when matching proposals to ground truth (bounds the memory for dense scenes).
_IOU_CHUNK_ELEMENTS = 1 << 22


def best_iou_match(boxes: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """For each of ``boxes`` ``[P, 4]``, the best IoU ``[P]`` with ``gt`` ``[M, 4]`` and that box's index ``[P]``.

    Computed in chunks of proposals so that ``P x M`` never exceeds ~4 M values at once.
    """
    if len(gt) == 0 or len(boxes) == 0:
        return boxes.new_zeros(len(boxes)), torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
    step = max(1, _IOU_CHUNK_ELEMENTS // len(gt))
    best, index = [], []
    for start in range(0, len(boxes), step):
        values, which = box_iou(boxes[start: start + step], gt).max(dim=1)
        best.append(values)
        index.append(which)
    return torch.cat(best), torch.cat(index)


def proposal_area_loss(proposals: list[Tensor], gt_boxes: list[Tensor], iou_floor: float = 0.5,
                       eps: float = 1.0) -> Tensor:
    """PAreaLoss over a batch.

    Args:
        proposals: per image ``[P_i, 4]`` xyxy proposals (with gradients).
        gt_boxes: per image ``[M_i, 4]`` xyxy ground-truth boxes, same pixels.
        iou_floor: proposals whose best IoU is at or below this are left out.
        eps: added to the ground-truth area (px²).

    Returns:
        A scalar: the mean squared relative area error over the kept proposals of all images; 0
        (attached to the graph) when none is kept.
    """
    errors = []
    for boxes, gt in zip(proposals, gt_boxes):
        boxes, gt = boxes.float(), gt.float()  # areas in float16 overflow past 256 x 256 px
        best, index = best_iou_match(boxes.detach(), gt)
        keep = best > iou_floor
        if keep.any():
            gt_area = box_area(gt[index[keep]])
            errors.append(((box_area(boxes[keep]) - gt_area) / (gt_area + eps)) ** 2)
    if not errors:
        return sum(b.sum() for b in proposals) * 0.0 if proposals else torch.zeros(())
    return torch.cat(errors).mean()


class AreaLossRegionProposalNetwork(DenseRegionProposalNetwork):
    """The dense RPN with ``loss_parea`` (weighted by ``area_weight``) added to its training losses.

    torchvision's forward is kept: the anchors and ground truth are noted when it assigns targets
    to anchors, and the loss is computed where it computes its own losses, from the un-detached
    box deltas of the positive anchors.
    """

    def __init__(self, *args: Any, area_weight: float = 1.0, area_iou_floor: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.area_weight = area_weight
        self.area_iou_floor = area_iou_floor
        self._assigned: tuple[list[Tensor], list[Tensor]] | None = None
        self._area_loss: Tensor | None = None

    def forward(self, images: Any, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None,
                ) -> tuple[list[Tensor], dict[str, Tensor]]:
        try:
            boxes, losses = super().forward(images, features, targets)
            if self.training:
                losses["loss_parea"] = self.area_weight * self._area_loss
            return boxes, losses
        finally:
            self._assigned = self._area_loss = None

    def assign_targets_to_anchors(self, anchors: list[Tensor], targets: list[dict[str, Tensor]],
                                  ) -> tuple[list[Tensor], list[Tensor]]:
        labels, matched_gt_boxes = super().assign_targets_to_anchors(anchors, targets)
        self._assigned = (anchors, [t["boxes"] for t in targets])
        return labels, matched_gt_boxes

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        """torchvision's two losses; on the way, PAreaLoss of the positive anchors' proposals.

        ``pred_bbox_deltas`` is ``[sum_i A_i, 4]``, images in order, as ``labels`` (per image ``[A_i]``).
        """
        anchors, gt_boxes = self._assigned
        proposals, start = [], 0
        for image_anchors, image_labels in zip(anchors, labels):
            positive = torch.where(image_labels == 1)[0]
            # float32: under autocast the deltas are float16, whose areas overflow past 256 x 256 px.
            deltas = pred_bbox_deltas[start: start + len(image_labels)][positive].float()
            proposals.append(self.box_coder.decode_single(deltas, image_anchors[positive].float()))
            start += len(image_labels)
        self._area_loss = proposal_area_loss(proposals, gt_boxes, self.area_iou_floor)
        return super().compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)
