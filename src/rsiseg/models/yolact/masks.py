"""Mask assembly: prototypes times coefficients, cropped to boxes, as ``M x M`` logits per box.

YOLACT assembles each detection's mask over the whole prototype map (``sigmoid(P C^T)``) and then
zeroes it outside the box. Sampling is linear, so sampling the k prototypes inside the box first
(``roi_align``) and combining the samples with the coefficients gives the same values at the sample
points, without a full-size map per detection: memory is ``D x k x M x M``, whatever the image size.
The box-relative ``M x M`` result is what the export, the merge and the overlays take as ``roi_masks``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rsiseg.models.layers.roi_align import roi_align

_CHUNK = 128  # boxes assembled at once: 128 x 32 x 28 x 28 floats = 13 MB


def assemble_roi_logits(prototypes: Tensor, coefficients: Tensor, boxes: Tensor, spatial_scale: float,
                        size: int) -> Tensor:
    """Mask logits of each box, sampled on an ``size x size`` grid inside the box.

    Args:
        prototypes: ``[k, h, w]`` prototype maps of one image.
        coefficients: ``[D, k]`` mask coefficients, one row per box.
        boxes: ``[D, 4]`` xyxy in the network input's pixels.
        spatial_scale: prototype pixels per input pixel (``w / W_input``, 0.25 for YOLACT).
        size: M.

    Returns:
        ``[D, M, M]`` logits: ``sum_j coefficients[d, j] * prototypes[j]`` sampled bilinearly inside box d.
    """
    if len(boxes) != len(coefficients):
        raise ValueError(f"{len(boxes)} boxes but {len(coefficients)} coefficient rows")
    out = []
    for start in range(0, len(boxes), _CHUNK):
        crops = roi_align(prototypes[None], [boxes[start: start + _CHUNK].to(prototypes.dtype)], output_size=size,
                          spatial_scale=spatial_scale, sampling_ratio=2, aligned=True)
        out.append(torch.einsum("dk,dkhw->dhw", coefficients[start: start + _CHUNK].to(crops.dtype), crops))
    return torch.cat(out) if out else prototypes.new_zeros((0, size, size))
