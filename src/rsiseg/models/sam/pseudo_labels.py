"""The teacher's pseudo-masks for one image's point prompts, with PointSAM's negative prompt calibration.

Instances do not overlap, but a point-prompted SAM often spills over a neighbour (two touching ships
answered as one). Calibration: where the teacher's mask for instance i covers the point of another
instance j or overlaps j's mask, j's point becomes a negative prompt (label 0) for i and i is decoded
again; then every pixel still claimed twice goes to one instance
(:func:`~rsiseg.models.sam.calibration.exclusive_masks`), so the pseudo-labels never overlap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rsiseg.models.sam.calibration import exclusive_masks, negative_prompts, overlap_negatives

if TYPE_CHECKING:
    from rsiseg.models.sam.model import PointSam


@torch.no_grad()
def teacher_pseudo_masks(model: PointSam, embedding: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's answers to one image's points, calibrated in the ``pointsam`` mode.

    Args:
        model: the PointSam whose ``teacher`` answers.
        embedding: float ``[1, D, e, e]``, the teacher's embedding of the weak view.
        points: float ``[N, 2]`` (x, y) in SAM's input coordinates (see
            :func:`~rsiseg.models.sam.model.to_sam_coordinates`), one positive point per instance.

    Returns:
        ``(pseudo-masks float [N, L, L] of 0/1, predicted IoU float [N])`` in the low-res frame.
    """
    low_res = model.low_res
    if len(points) == 0:
        return embedding.new_zeros((0, low_res, low_res)), embedding.new_zeros(0)
    flags = torch.ones((len(points), 1), device=points.device)
    logits, iou = model.decode_all(embedding, points[:, None], flags, multimask=model.options.multimask,
                                   model=model.teacher)
    rows = torch.arange(len(points), device=points.device)
    best = iou.argmax(dim=1)
    logits, iou = logits[rows, best], iou[rows, best]
    if model.options.mode != "pointsam" or not model.options.calibration or len(points) < 2:
        return (logits > 0).float(), iou
    low_points = (points + 0.5) * (low_res / model.image_size)  # back to continuous coordinates
    negatives = overlap_negatives(logits > 0, low_points)
    redo = [i for i, found in enumerate(negatives) if len(found)]
    if redo:
        coords, labels = negative_prompts(points, negatives)
        again, again_iou = model.decode_all(embedding, coords[redo], labels[redo].float(), multimask=False,
                                            model=model.teacher)
        logits[redo], iou[redo] = again[:, 0], again_iou[:, 0]
    return exclusive_masks(logits > 0, iou, low_points).float(), iou
