"""Partial cross-entropy: the loss of point-supervised segmentation, computed at labelled pixels only.

From "Partial Cross Entropy Loss for Remote Sensing Image Segmentation with Point Annotations":
cross-entropy restricted to the annotated points, with a focal term ``(1 - p_t) ** gamma`` that
weights hard points up, and per-class weights (inverse class frequency) against class imbalance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def partial_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor | None = None,
    gamma: float = 0.0,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Focal, class-weighted cross-entropy over the labelled pixels.

    ``loss = sum_i w[y_i] (1 - p_i) ** gamma (-log p_i) / sum_i w[y_i]`` over the pixels ``i`` whose
    label is not ``ignore_index``, ``p_i`` being the softmax probability of the true class ``y_i``.
    With ``gamma = 0`` this is ``F.cross_entropy(logits, labels, weight, ignore_index=...)``.

    Args:
        logits: float ``[B, K, H, W]`` class scores.
        labels: int64 ``[B, H, W]`` class indices in ``0..K-1``, or ``ignore_index`` (unlabelled).
        weight: float ``[K]`` class weights, or None for ones.
        gamma: focal exponent (>= 0); 0 gives plain cross-entropy.
        ignore_index: label value of unlabelled pixels.

    Returns:
        A scalar. Exactly 0 (still attached to ``logits``, never NaN) when no pixel is labelled,
        or when every labelled pixel has class weight 0.
    """
    if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"expected logits [B, K, H, W] and labels [B, H, W], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    labelled = labels != ignore_index
    safe_labels = torch.where(labelled, labels, torch.zeros_like(labels))  # any valid index; masked out below
    log_probs = F.log_softmax(logits.float(), dim=1)
    log_pt = log_probs.gather(1, safe_labels.unsqueeze(1)).squeeze(1)  # [B, H, W]
    per_pixel = -log_pt
    if gamma:
        per_pixel = per_pixel * (1.0 - log_pt.exp()).clamp_min(0.0) ** gamma
    pixel_weight = labelled.to(per_pixel.dtype)
    if weight is not None:
        pixel_weight = pixel_weight * weight.to(per_pixel)[safe_labels]
    total = (per_pixel * pixel_weight).sum()
    norm = pixel_weight.sum()
    # Dividing by 1 when nothing counts keeps the result 0 (total is 0 then) and the gradient finite.
    return total / torch.where(norm > 0, norm, torch.ones_like(norm))
