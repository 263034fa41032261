"""Mask targets and the mask loss of RoI-based models, sampled per RoI from compact instance masks.

Every family that predicts a mask inside a box (Mask R-CNN, Cascade, the prompt modules) gets its
targets here, so no model ever needs full-size ground-truth rasters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def roi_mask_targets(
    rois: list[Tensor], matched: list[Tensor], targets: list[dict[str, Tensor]], size: int,
) -> Tensor:
    """The ground-truth mask of each RoI's matched instance, sampled inside the RoI.

    Args:
        rois: per image ``[K_i, 4]`` xyxy boxes in the network input's pixels.
        matched: per image ``[K_i]`` int64 index of the matched instance in ``targets[i]``.
        targets: per image ``masks`` (:class:`~rsiseg.masks.InstanceMasks` at source resolution)
            and optionally ``mask_scale`` float ``[2]`` (input / source, x then y).
        size: output side M.

    Returns:
        ``[sum K_i, M, M]`` float targets in [0, 1], as ``roi_align`` of full-size masks would give.
    """
    out = []
    for boxes, idx, target in zip(rois, matched, targets):
        scale = target.get("mask_scale")
        source_boxes = boxes / scale.to(boxes).repeat(2) if scale is not None else boxes
        out.append(target["masks"].crop_and_resize(source_boxes, idx, size))
    return torch.cat(out) if out else torch.zeros((0, size, size))


def mask_rcnn_loss(
    mask_logits: Tensor, rois: list[Tensor], matched: list[Tensor], targets: list[dict[str, Tensor]],
) -> Tensor:
    """Binary cross-entropy of each positive RoI's mask logits for its ground-truth class.

    Args:
        mask_logits: ``[K, num_classes + 1, M, M]`` for the positive RoIs of all images, in order.
        rois, matched, targets: as :func:`roi_mask_targets`; ``targets[i]["labels"]`` int64 ``[N_i]``.

    Returns:
        A scalar; 0 (still attached to the graph) when there is no positive RoI.
    """
    labels = torch.cat([t["labels"][idx] for t, idx in zip(targets, matched)]) if targets else None
    if labels is None or labels.numel() == 0:
        return mask_logits.sum() * 0
    mask_targets = roi_mask_targets(rois, matched, targets, mask_logits.shape[-1])
    picked = mask_logits[torch.arange(len(labels), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(picked, mask_targets.to(picked))
