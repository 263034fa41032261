"""YOLACT inference: ranking, the class-aware pre-NMS top-k, Fast NMS and the kept detections.

Shapes: N anchors, K classes (background excluded), T = the per-class top-k.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def batched_box_iou(boxes: Tensor) -> Tensor:
    """Pairwise IoU within each group: ``[G, T, 4]`` xyxy -> ``[G, T, T]``."""
    area = (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    top_left = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
    bottom_right = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    return inter / (area[:, :, None] + area[:, None, :] - inter).clamp(min=1e-9)


def fast_nms(boxes: Tensor, iou_threshold: float) -> Tensor:
    """YOLACT's Fast NMS: in each group, a box goes when any higher-ranked box overlaps it by more than
    ``iou_threshold``, whether or not that box was itself kept (one matrix operation, no loop).

    Args:
        boxes: ``[G, T, 4]`` xyxy, each group (class) sorted by descending score.

    Returns:
        ``bool [G, T]``: kept.
    """
    if boxes.shape[1] == 0:
        return torch.zeros(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
    iou = batched_box_iou(boxes).triu(diagonal=1)  # [g, i, j]: i ranked above j
    return iou.max(dim=1).values <= iou_threshold


class Detections(NamedTuple):
    """Kept detections of one image, best first: ``anchors`` int64 ``[D]`` (index into the N anchors),
    ``labels`` int64 ``[D]`` in 1..K, ``scores`` ``[D]`` (the ranking score)."""

    anchors: Tensor
    labels: Tensor
    scores: Tensor


def select_detections(
    class_probs: Tensor, rank_scores: Tensor, boxes: Tensor, score_threshold: float, iou_threshold: float,
    top_k: int, max_detections: int,
) -> Detections:
    """Candidates, per-class top-k by ranking score, Fast NMS, then the best ``max_detections`` over classes.

    Args:
        class_probs: ``[N, K]`` softmax class confidences (background column dropped).
        rank_scores: ``[N, K]`` what detections are ranked by: ``class_probs`` itself (YOLACT) or
            ``class_probs`` times the predicted mask quality (RELACT's optimized sorting).
        boxes: ``[N, 4]`` decoded xyxy boxes.
        score_threshold: a (anchor, class) pair is a candidate when its class confidence is above this;
            the ranking score only orders the candidates, so both rankings start from the same set.
        iou_threshold: Fast NMS threshold.
        top_k: candidates per class that enter Fast NMS (class-aware; large for dense scenes).
        max_detections: detections kept per image.
    """
    candidate = (class_probs > score_threshold).t()  # [K, N]
    ranked = torch.where(candidate, rank_scores.t(), torch.full_like(rank_scores.t(), -1.0))
    values, order = ranked.topk(min(top_k, ranked.shape[1]), dim=1)  # [K, T], sorted
    valid = candidate.gather(1, order)
    keep = fast_nms(boxes[order], iou_threshold) & valid
    classes, slots = torch.nonzero(keep, as_tuple=True)
    scores = values[classes, slots]
    best = scores.argsort(descending=True, stable=True)[:max_detections]
    return Detections(order[classes, slots][best], classes[best] + 1, scores[best])
