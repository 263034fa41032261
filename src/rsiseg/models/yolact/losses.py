"""YOLACT's losses: class (softmax cross-entropy with 3:1 online hard-negative mining), box (smooth L1),
mask (BCE of the assembled masks inside the ground-truth box), the auxiliary semantic loss on P3, and
RELACT's mask-quality loss.

Shapes: B images, N anchors, K classes (background excluded), k prototypes, M the mask side.
Normalisation follows YOLACT: the class and box losses are summed and divided by the number of
positive anchors in the batch; the mask loss is each trained instance's mean BCE over its box (the
box-area normalisation), averaged over the trained instances.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rsiseg.models.layers.mask_targets import roi_mask_targets
from rsiseg.models.yolact.masks import assemble_roi_logits


class AnchorTargets(NamedTuple):
    """Anchor assignment of a batch: ``labels`` int64 ``[B, N]`` (1..K positive, 0 negative, -1 ignored)
    and ``matched`` int64 ``[B, N]`` (the ground-truth instance of each positive anchor, 0 elsewhere)."""

    labels: Tensor
    matched: Tensor


def class_loss(logits: Tensor, labels: Tensor, negpos_ratio: int) -> Tensor:
    """Softmax cross-entropy over the positives and the hardest negatives, summed.

    Each image keeps ``negpos_ratio`` negatives per positive, those with the highest background loss;
    an image without objects keeps ``negpos_ratio`` of them, so empty tiles still teach background.

    Args:
        logits: ``[B, N, K + 1]``.
        labels: ``[B, N]`` as in :class:`AnchorTargets`.
    """
    loss = F.cross_entropy(logits.flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none").view(labels.shape)
    negative = labels == 0
    with torch.no_grad():
        mining = loss.detach().masked_fill(~negative, -1.0)
        rank = mining.argsort(dim=1, descending=True).argsort(dim=1)
        wanted = (negpos_ratio * (labels > 0).sum(dim=1).clamp(min=1)).clamp(max=negative.sum(dim=1))
        hard = negative & (rank < wanted[:, None])
    return loss[(labels > 0) | hard].sum()


def box_loss(deltas: Tensor, target_deltas: Tensor) -> Tensor:
    """Smooth L1 (beta 1) of the positives' ``[P, 4]`` encoded deltas, summed."""
    return F.smooth_l1_loss(deltas, target_deltas, beta=1.0, reduction="sum")


class MaskLosses(NamedTuple):
    """``mask``: mean over trained instances of their mean BCE inside the box; ``quality``: BCE of the
    quality logits against each instance's mask IoU (None when no quality is predicted)."""

    mask: Tensor
    quality: Tensor | None


def mask_losses(
    prototypes: Tensor, coefficients: Tensor, quality: Tensor | None, targets: AnchorTargets,
    gt: list[dict[str, Tensor]], spatial_scale: float, size: int, masks_per_image: int,
) -> MaskLosses:
    """The mask loss (and the quality loss) of up to ``masks_per_image`` positive anchors per image.

    Each positive anchor's mask is assembled from its coefficients inside its ground-truth box and
    compared with the instance's mask sampled on the same ``M x M`` grid. The quality target of an
    anchor is the IoU of its binarised mask (logit > 0) with the ground truth on that grid, detached.

    Args:
        prototypes: ``[B, k, h, w]``.
        coefficients: ``[B, N, k]``.
        quality: ``[B, N]`` logits, or None.
        targets: the anchors' assignment.
        gt: per image ``boxes`` ``[n, 4]`` (network input pixels), ``masks`` (InstanceMasks) and ``mask_scale``.
        spatial_scale, size: as :func:`~rsiseg.models.yolact.masks.assemble_roi_logits`.
        masks_per_image: the cap of trained positives per image (a random draw above it).
    """
    losses, qualities, ious = [], [], []
    for b, target in enumerate(gt):
        positive = torch.nonzero(targets.labels[b] > 0)[:, 0]
        if len(positive) > masks_per_image:
            positive = positive[torch.randperm(len(positive), device=positive.device)[:masks_per_image]]
        if len(positive) == 0:
            continue
        instance = targets.matched[b, positive]
        boxes = target["boxes"][instance]
        logits = assemble_roi_logits(prototypes[b], coefficients[b, positive], boxes, spatial_scale, size)
        truth = roi_mask_targets([boxes], [instance], [target], size).to(logits)
        losses.append(F.binary_cross_entropy_with_logits(logits, truth, reduction="none").mean(dim=(1, 2)))
        if quality is not None:
            qualities.append(quality[b, positive])
            ious.append(mask_iou(logits.detach() > 0, truth > 0.5))
    if not losses:
        zero = coefficients.sum() * 0
        return MaskLosses(zero, None if quality is None else zero + quality.sum() * 0)
    mask = torch.cat(losses).mean()
    if quality is None:
        return MaskLosses(mask, None)
    return MaskLosses(mask, F.binary_cross_entropy_with_logits(torch.cat(qualities), torch.cat(ious)))


def mask_iou(pred: Tensor, truth: Tensor) -> Tensor:
    """IoU of ``bool [P, M, M]`` masks, pairwise by row -> ``[P]`` (1 where both are empty)."""
    inter = (pred & truth).flatten(1).sum(1).float()
    union = (pred | truth).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def semantic_targets(target: dict[str, Tensor], num_classes: int, height: int, width: int, stride: float) -> Tensor:
    """``[K, height, width]`` float: 1 where an instance of the class covers the P3 cell.

    The network input is the source image scaled by ``mask_scale`` and padded at the bottom and right;
    P3 covers it at ``1 / stride``, so the instance masks are resized to the image's part of the grid.
    """
    out = torch.zeros((num_classes, height, width), device=target["boxes"].device)
    masks = target["masks"]
    if len(masks) == 0:
        return out
    scale = target["mask_scale"].tolist()
    rows = min(height, max(1, round(masks.image_size[0] * scale[1] / stride)))
    cols = min(width, max(1, round(masks.image_size[1] * scale[0] / stride)))
    full = masks.resize(rows, cols).to_full().to(out.device, torch.float32)
    labels = target["labels"]
    for label in labels.unique().tolist():
        out[label - 1, :rows, :cols] = full[labels == label].amax(dim=0)
    return out


def semantic_loss(logits: Tensor, gt: list[dict[str, Tensor]], stride: float) -> Tensor:
    """BCE of the ``[B, K, h, w]`` P3 logits against each class's instance union, summed over classes,
    averaged over cells and images (YOLACT's semantic segmentation loss)."""
    batch, classes, height, width = logits.shape
    truth = torch.stack([semantic_targets(t, classes, height, width, stride) for t in gt]).to(logits)
    return F.binary_cross_entropy_with_logits(logits, truth, reduction="sum") / (height * width * batch)
