"""SAM's mask losses (focal + dice on the mask logits, MSE on the predicted IoU), per prompt.

As in the SAM paper, the mask loss is a 20:1 combination of focal and dice loss, and the IoU head
is trained with the mean squared error between its prediction and the IoU that the predicted mask
actually reaches. Per-mask weights let pseudo-masks below a confidence threshold count for nothing
(weight 0) without changing the shape of the batch.

Logits and targets must share one resolution: the caller upsamples the logits (or downsamples
the targets) first. All losses are computed in float32, so they are safe under autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

# Denominator floor of the weighted means: all-zero weights give a zero loss, not 0/0.
_MIN_WEIGHT_SUM = 1e-6


def _check(logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 3 or logits.shape != targets.shape:
        raise ValueError(
            f"expected logits and targets [N, H, W] of one shape, got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )


def focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (Lin et al.) averaged over each mask's pixels.

    Args:
        logits: ``[N, H, W]`` mask logits.
        targets: ``[N, H, W]`` float in [0, 1] (or bool).
        alpha: weight of the positive pixels in (0, 1); negative disables the weighting.
        gamma: focusing exponent.

    Returns:
        ``[N]`` float32, >= 0.
    """
    _check(logits, targets)
    loss = sigmoid_focal_loss(logits.float(), targets.float(), alpha=alpha, gamma=gamma, reduction="none")
    return loss.flatten(1).mean(1)


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Soft dice loss ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``, ``p = sigmoid(logits)``, per mask.

    Args:
        logits: ``[N, H, W]`` mask logits.
        targets: ``[N, H, W]`` float in [0, 1] (or bool).

    Returns:
        ``[N]`` float32 in [0, 1); the +1 smoothing makes an empty prediction of an empty target 0.
    """
    _check(logits, targets)
    probs = logits.float().sigmoid().flatten(1)
    goal = targets.float().flatten(1)
    return 1.0 - (2.0 * (probs * goal).sum(1) + 1.0) / (probs.sum(1) + goal.sum(1) + 1.0)


def mask_iou(logits: Tensor, targets: Tensor, threshold: float = 0.0) -> Tensor:
    """IoU of the binarised prediction (``logits > threshold``) with the binarised target (``> 0.5``).

    Args:
        logits: ``[N, H, W]`` mask logits.
        targets: ``[N, H, W]`` float in [0, 1] (or bool).
        threshold: logit threshold (0.0 is probability 0.5, SAM's ``mask_threshold``).

    Returns:
        ``[N]`` float32 in [0, 1], no gradient. An empty prediction of an empty target scores 1: it is
        exactly right, and this is the value SAM's IoU head should learn for it.
    """
    _check(logits, targets)
    pred = (logits.detach() > threshold).flatten(1)
    goal = (targets.detach() > 0.5).flatten(1)
    inter = (pred & goal).sum(1).float()
    union = (pred | goal).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def _weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    return (weights * values).sum() / weights.sum().clamp_min(_MIN_WEIGHT_SUM)


def sam_losses(
    logits: Tensor,
    targets: Tensor,
    iou_pred: Tensor,
    weights: Tensor | None = None,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    *,
    reduce: bool = True,
) -> dict[str, Tensor]:
    """SAM's training losses for N prompts, each answered by one mask.

    Args:
        logits: ``[N, H, W]`` mask logits.
        targets: ``[N, H, W]`` float in [0, 1] (or bool): ground-truth or pseudo masks.
        iou_pred: ``[N]`` (or any shape with N elements, e.g. ``[N, 1]``) predicted IoU.
        weights: ``[N]`` float >= 0 per-mask weights (e.g. 0 for pseudo-masks below the confidence
            threshold); None weighs every mask 1.
        focal_weight, dice_weight, iou_weight: each term is multiplied by its weight (SAM: 20, 1, 1).
        reduce: True gives scalars; False gives the ``[N]`` per-mask terms (each times its loss weight
            and its mask weight), e.g. to pick the best of SAM's multimask answers.

    Returns:
        ``{"loss_focal", "loss_dice", "loss_iou"}``, float32, already multiplied by their loss weights
        so that a trainer can sum them. Each scalar is the weighted mean over masks
        ``sum(w * l) / max(sum(w), 1e-6)``: 0, still connected to the graph of ``logits`` and
        ``iou_pred``, when N == 0 or every weight is 0. ``loss_iou`` trains ``iou_pred`` only; its
        target, :func:`mask_iou`, is detached.
    """
    _check(logits, targets)
    count = logits.shape[0]
    if iou_pred.numel() != count:
        raise ValueError(f"iou_pred must hold one value per mask ({count}), got shape {tuple(iou_pred.shape)}")
    if weights is None:
        weights = logits.new_ones(count, dtype=torch.float32)
    elif weights.shape != (count,):
        raise ValueError(f"weights must be [N] = [{count}], got {tuple(weights.shape)}")
    weights = weights.detach().float()
    per_mask = {
        "loss_focal": focal_weight * focal_loss(logits, targets),
        "loss_dice": dice_weight * dice_loss(logits, targets),
        "loss_iou": iou_weight * (iou_pred.reshape(count).float() - mask_iou(logits, targets)) ** 2,
    }
    if not reduce:
        return {name: weights * value for name, value in per_mask.items()}
    return {name: _weighted_mean(value, weights) for name, value in per_mask.items()}
