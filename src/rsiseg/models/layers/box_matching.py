"""Anchor and proposal matching for dense scenes, without the ``M x A`` IoU matrix.

torchvision's RPN and RoI heads compute ``box_iou(gt, anchors)`` in one go: on an 800 px image
(160,000 anchors) with 5,000 instances that is 800 M IoU values and several temporaries of
twice that size, a term in image area x instance count that no GPU or laptop holds. Here boxes
are matched in spatially compact chunks (sorted by top edge), each against only the ground truth
that overlaps it, with exactly torchvision's :class:`Matcher` rules, including the low-quality
matches. Memory stays near ``chunk x overlapping instances``. Small problems (up to 4 M pairs)
take torchvision's dense path, which is faster there.

Use: :func:`use_local_matching` makes :class:`BoxPairs` the RPN's or RoI heads'
``box_similarity`` and :class:`LocalMatcher` their ``proposal_matcher``; torchvision's code then
calls them unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

# Up to this many IoU values the matrix is simply computed whole (faster; ~32 MB per [M, A, 2] temporary).
_DENSE_ELEMENTS = 1 << 22
# IoU values computed at once per chunk: 4 M floats keep each chunk's temporaries to tens of MB.
_CHUNK_ELEMENTS = 1 << 22
_CHUNK_BOXES = 4096


class BoxPairs(NamedTuple):
    """Ground-truth ``[M, 4]`` and candidate ``[A, 4]`` xyxy boxes, whose IoU :class:`LocalMatcher`
    computes lazily; ``BoxPairs(gt, boxes)`` stands in for ``box_iou(gt, boxes)``."""

    gt: Tensor
    boxes: Tensor


def _chunk_plan(gt: Tensor, boxes: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Chunks of ``boxes`` as ``(box indices, indices of the gt boxes that overlap the chunk)``.

    Boxes are grouped by size (powers of two of their side), then sorted by top edge, so each chunk
    is a narrow band of similar boxes and meets few instances. Chunks meeting none are left out.
    """
    side = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1).sqrt()
    order = torch.argsort(boxes[:, 1], stable=True)
    order = order[torch.argsort(torch.floor(torch.log2(side[order])), stable=True)]
    plan, start = [], 0
    while start < len(order):
        idx = order[start: start + _CHUNK_BOXES]
        near = _overlapping(gt, boxes[idx])
        if len(near) * len(idx) > _CHUNK_ELEMENTS:  # many instances nearby: a smaller chunk
            idx = idx[: max(1, _CHUNK_ELEMENTS // len(near))]
            near = _overlapping(gt, boxes[idx])
        if len(near):
            plan.append((idx, near))
        start += len(idx)
    return plan


def _overlapping(gt: Tensor, boxes: Tensor) -> Tensor:
    """Indices of the ``gt`` boxes that overlap the bounding box of ``boxes``."""
    lo, hi = boxes[:, :2].min(0).values, boxes[:, 2:].max(0).values
    return torch.nonzero((gt[:, 0] < hi[0]) & (gt[:, 2] > lo[0]) & (gt[:, 1] < hi[1]) & (gt[:, 3] > lo[1]))[:, 0]


class LocalMatcher(Matcher):
    """torchvision's :class:`Matcher` computed chunk by chunk from :class:`BoxPairs`.

    Returns the same ``int64 [A]`` matches: a ground-truth index, ``BELOW_LOW_THRESHOLD`` (-1) or
    ``BETWEEN_THRESHOLDS`` (-2); ``allow_low_quality_matches`` restores, for every instance, the
    boxes of highest IoU with it (ties included), as torchvision does.
    """

    def __call__(self, pairs: BoxPairs) -> Tensor:  # type: ignore[override]
        gt, boxes = pairs
        if len(gt) == 0:
            raise ValueError("No ground-truth boxes available for one of the images during training")
        if len(boxes) == 0:
            raise ValueError("No proposal boxes available for one of the images during training")
        if len(gt) * len(boxes) <= _DENSE_ELEMENTS:
            return super().__call__(box_iou(gt, boxes))
        best = torch.zeros(len(boxes), dtype=gt.dtype, device=gt.device)
        matches = torch.zeros(len(boxes), dtype=torch.int64, device=gt.device)
        highest = torch.zeros(len(gt), dtype=gt.dtype, device=gt.device)
        plan = _chunk_plan(gt, boxes)
        for idx, near in plan:
            iou = box_iou(gt[near], boxes[idx])
            values, which = iou.max(dim=0)
            best[idx], matches[idx] = values, near[which]
            highest[near] = torch.maximum(highest[near], iou.max(dim=1).values)
        all_matches = matches.clone()
        matches[best < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        matches[(best >= self.low_threshold) & (best < self.high_threshold)] = self.BETWEEN_THRESHOLDS
        if self.allow_low_quality_matches:
            for idx, near in plan:  # IoU again rather than kept: memory stays at one chunk
                top = highest[near]
                iou = box_iou(gt[near], boxes[idx])
                hit = torch.nonzero((iou == top[:, None]) & (top[:, None] > 0))[:, 1]
                update = idx[hit]
                matches[update] = all_matches[update]
        return matches


def match_boxes(matcher: LocalMatcher, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Matched instance (int64 ``[K]``, 0 where none) and label (int64 ``[K]``: the instance's
    class, 0 background, -1 ignored) of each of ``boxes`` ``[K, 4]``, as torchvision's RoI heads
    assign them, with the matcher fed lazily (:class:`BoxPairs`)."""
    if gt_boxes.numel() == 0:
        zeros = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
        return zeros, zeros.clone()
    matches = matcher(BoxPairs(gt_boxes, boxes))
    matched = matches.clamp(min=0)
    labels = gt_labels[matched].to(torch.int64)
    labels[matches == matcher.BELOW_LOW_THRESHOLD] = 0
    labels[matches == matcher.BETWEEN_THRESHOLDS] = -1
    return matched, labels


def use_local_matching(module: torch.nn.Module) -> None:
    """Make a torchvision RPN or RoI heads module match with :class:`LocalMatcher`, same thresholds.

    Called from the constructors of :class:`DenseRegionProposalNetwork` and the RoI heads.
    """
    matcher = module.proposal_matcher
    module.box_similarity = BoxPairs
    module.proposal_matcher = LocalMatcher(matcher.high_threshold, matcher.low_threshold,
                                           matcher.allow_low_quality_matches)


class DenseRegionProposalNetwork(RegionProposalNetwork):
    """torchvision's :class:`RegionProposalNetwork` (same arguments and weights) with chunked anchor matching."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        use_local_matching(self)
