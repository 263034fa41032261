"""Pasting box-relative mask probabilities into the image, one box-sized window at a time.

Mask R-CNN predicts each detection's mask as ``M x M`` probabilities over its box (M = 28).
torchvision's ``paste_masks_in_image`` resizes them into a full ``[N, 1, H, W]`` tensor, which
for a dense scene (1000 detections on 800 x 800) is 2.5 GB of mostly zeros. The functions here
reproduce its arithmetic exactly but keep only the part inside each box:

* the ``M x M`` grid is zero-padded by one cell and the box grown by ``(M + 2) / M`` about its
  centre (torchvision's ``expand_masks`` / ``expand_boxes``), so the mask can fade out at the
  box edge;
* the grown box is truncated to int64 (towards zero, as ``Tensor.to(torch.int64)``), covers the
  pixels ``x1..x2`` and ``y1..y2`` inclusive (``TO_REMOVE = 1``) and is at least 1 x 1;
* the padded grid is resized to that size with bilinear ``F.interpolate`` (``align_corners=False``)
  and clipped to the image.

A window is ``(local, x0, y0)``: ``local`` is ``float32 [h, w]`` and covers the image pixels
``[y0:y0 + h, x0:x0 + w]``, always inside the image (``h`` or ``w`` is 0 for a box entirely
outside it). The full-size mask is ``local`` there and 0 everywhere else.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

from rsiseg.structures import window_to_rle

# torchvision's padding in paste_masks_in_image: one zero cell around the M x M grid.
_PADDING = 1

Window = tuple[torch.Tensor, int, int]  # (local float32 [h, w], x0, y0)
ImageSize = Sequence[int] | torch.Tensor


def iter_windows(roi_masks: torch.Tensor, boxes: torch.Tensor, image_size: ImageSize) -> Iterator[Window]:
    """Paste many detections, yielding each one's window in input order.

    Equals ``paste_masks_in_image(roi_masks[:, None], boxes, image_size)[i, 0]`` inside window
    ``i`` and 0 outside it, without allocating ``H x W``. Padding and box growth are vectorised;
    the resize loops in Python because every box has its own size.

    Args:
        roi_masks: ``float32 [N, M, M]`` (or ``[N, 1, M, M]``) probabilities in [0, 1] over each
            box, any device.
        boxes: ``float32 [N, 4]`` xyxy in original-image pixels, any device (other dtypes are
            converted to float32, the dtype the grown boxes are computed and truncated in).
        image_size: ``(H, W)`` of the original image (ints or an int tensor of 2 elements).

    Yields:
        ``(local, x0, y0)``: ``local`` is ``float32 [h, w]`` on the device of ``roi_masks``,
        covering rows ``y0..y0 + h - 1`` and columns ``x0..x0 + w - 1``.

    Raises:
        ValueError: shapes of ``roi_masks`` and ``boxes`` disagree.
    """
    roi_masks, boxes = _check_rois(roi_masks, boxes)
    height, width = _image_hw(image_size)
    padded, scale = expand_masks(roi_masks[:, None].float(), padding=_PADDING)
    int_boxes = expand_boxes(boxes, scale).to(dtype=torch.int64).tolist()  # one host sync for all
    for grid, box in zip(padded, int_boxes):
        yield _paste_one(grid, box, height, width)


def paste_window(roi_mask: torch.Tensor, box: torch.Tensor, image_size: ImageSize) -> Window:
    """Paste one detection's ``[M, M]`` probabilities into its box; see :func:`iter_windows`.

    Args:
        roi_mask: ``float32 [M, M]`` probabilities in [0, 1] over the box.
        box: ``float [4]`` xyxy in original-image pixels.
        image_size: ``(H, W)`` of the original image.

    Returns:
        ``(local float32 [h, w], x0, y0)``, the window clipped to the image.
    """
    return next(iter_windows(torch.as_tensor(roi_mask)[None], torch.as_tensor(box).reshape(1, 4), image_size))


def roi_masks_to_rles(
    roi_masks: torch.Tensor, boxes: torch.Tensor, image_size: ImageSize, threshold: float = 0.5
) -> list[dict[str, Any]]:
    """Binarise each pasted mask at ``> threshold`` and encode it as a full-image COCO RLE.

    Identical to ``masks_to_rles`` of the thresholded ``paste_masks_in_image`` output, but the
    cost grows with the boxes, not with ``N x H x W``.

    Args:
        roi_masks: ``float32 [N, M, M]`` (or ``[N, 1, M, M]``) probabilities over each box.
        boxes: ``float [N, 4]`` xyxy in original-image pixels.
        image_size: ``(H, W)`` of the original image.
        threshold: a pixel is foreground when its probability is strictly above it; must be
            >= 0, because pixels outside the box (probability 0) are background by construction.

    Returns:
        ``N`` JSON-ready RLEs ``{"size": [H, W], "counts": str}``, in input order.

    Raises:
        ValueError: ``threshold < 0``, or shapes disagree.
    """
    if threshold < 0:
        raise ValueError(f"mask threshold must be >= 0 (pixels outside a box are 0), got {threshold}")
    height, width = _image_hw(image_size)
    return [
        window_to_rle((local > threshold).cpu().numpy(), x0, y0, height, width)
        for local, x0, y0 in iter_windows(roi_masks, boxes, (height, width))
    ]


def paste_full(roi_masks: torch.Tensor, boxes: torch.Tensor, image_size: ImageSize) -> torch.Tensor:
    """Full-size probabilities, for callers that need ``[N, H, W]`` rasters.

    Args:
        roi_masks: ``float32 [N, M, M]`` (or ``[N, 1, M, M]``) probabilities over each box.
        boxes: ``float [N, 4]`` xyxy in original-image pixels.
        image_size: ``(H, W)`` of the original image.

    Returns:
        ``float32 [N, H, W]`` on the device of ``roi_masks``, equal to
        ``paste_masks_in_image(roi_masks[:, None], boxes, (H, W))[:, 0]``. It takes
        ``4 N H W`` bytes: prefer :func:`iter_windows` for dense scenes.
    """
    height, width = _image_hw(image_size)
    roi_masks = torch.as_tensor(roi_masks)
    full = torch.zeros((len(roi_masks), height, width), dtype=torch.float32, device=roi_masks.device)
    for i, (local, x0, y0) in enumerate(iter_windows(roi_masks, boxes, (height, width))):
        full[i, y0 : y0 + local.shape[0], x0 : x0 + local.shape[1]] = local
    return full


def _paste_one(grid: torch.Tensor, box: list[int], height: int, width: int) -> Window:
    """Resize one padded ``[1, M + 2, M + 2]`` grid to its int box and clip it to the image."""
    bx1, by1, bx2, by2 = box
    w, h = max(bx2 - bx1 + 1, 1), max(by2 - by1 + 1, 1)
    resized = F.interpolate(grid[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    # Clamped so that a box outside the image gives an empty window at a valid offset
    # (torchvision's own slicing is only defined for boxes that overlap the image).
    x0, y0 = min(max(bx1, 0), width), min(max(by1, 0), height)
    x1, y1 = max(min(bx2 + 1, width), x0), max(min(by2 + 1, height), y0)
    return resized[y0 - by1 : y1 - by1, x0 - bx1 : x1 - bx1], x0, y0


def _check_rois(roi_masks: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``roi_masks`` as ``[N, M, M]`` and ``boxes`` as ``float32 [N, 4]`` (no copies when already so)."""
    roi_masks = torch.as_tensor(roi_masks).detach()
    boxes = torch.as_tensor(boxes).detach()
    if roi_masks.ndim == 4 and roi_masks.shape[1] == 1:
        roi_masks = roi_masks[:, 0]
    # float32 like the model's boxes, so that export and overlays of one prediction truncate the
    # grown boxes identically whatever dtype a caller passes (numpy gives float64).
    boxes = boxes.to(torch.float32)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if roi_masks.ndim != 3 or boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) != len(roi_masks):
        raise ValueError(
            f"roi_masks {tuple(roi_masks.shape)} and boxes {tuple(boxes.shape)} disagree; "
            "want roi_masks [N, M, M] (or [N, 1, M, M]) and boxes [N, 4]"
        )
    return roi_masks, boxes


def _image_hw(image_size: ImageSize) -> tuple[int, int]:
    """``(H, W)`` as Python ints from a sequence or tensor of two sizes."""
    values = torch.as_tensor(image_size).flatten().tolist()
    if len(values) != 2:
        raise ValueError(f"image_size must be (H, W), got {values}")
    return int(values[0]), int(values[1])
