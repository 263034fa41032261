"""The target/prediction contract and conversions between box, polygon, RLE and mask.

Conventions used everywhere in rsiseg:

* boxes are ``xyxy`` in absolute pixels (float), COCO boxes are ``xywh``;
* a COCO segmentation is either a list of polygons ``[[x0, y0, x1, y1, ...], ...]``,
  an uncompressed RLE ``{"size": [H, W], "counts": [int, ...]}`` or a compressed RLE
  ``{"size": [H, W], "counts": str | bytes}``;
* a binary mask is ``uint8[H, W]`` with values in {0, 1}.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

Segmentation = list[list[float]] | dict[str, Any]


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Convert ``[N, 4]`` xywh boxes to xyxy."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """Convert ``[N, 4]`` xyxy boxes to xywh."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], dim=-1)


def segmentation_to_rle(segm: Segmentation, height: int, width: int) -> dict[str, Any]:
    """Turn any COCO segmentation into one compressed RLE of an ``H x W`` image.

    Polygons of one instance are merged into a single RLE. ``counts`` stays ``bytes``.
    """
    if isinstance(segm, list):
        rles = mask_utils.frPyObjects(segm, height, width)
        return mask_utils.merge(rles)
    if isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, height, width)
    if isinstance(segm, dict) and "counts" in segm:
        counts = segm["counts"]
        return {"size": list(segm["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    raise ValueError(f"unsupported segmentation type {type(segm).__name__}")


def segmentation_to_mask(segm: Segmentation, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation to ``uint8[H, W]`` in {0, 1}."""
    return mask_utils.decode(segmentation_to_rle(segm, height, width)).astype(np.uint8)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode a binary ``[H, W]`` mask as a JSON-ready compressed RLE (``counts`` is ``str``)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def masks_to_rles(masks: np.ndarray) -> list[dict[str, Any]]:
    """Encode ``uint8[N, H, W]`` binary masks as JSON-ready compressed RLEs."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def rle_area(rle: dict[str, Any]) -> float:
    """Foreground pixel count of a compressed RLE."""
    return float(mask_utils.area(_bytes_counts(rle)))


def rle_to_xywh(rle: dict[str, Any]) -> list[float]:
    """Tight ``xywh`` box of a compressed RLE (zeros for an empty mask)."""
    return [float(v) for v in mask_utils.toBbox(_bytes_counts(rle))]


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes ``[N, 4]`` of ``[N, H, W]`` masks; pixel-edge convention (x2 = last col + 1)."""
    if masks.numel() == 0:
        return torch.zeros((masks.shape[0], 4), dtype=torch.float32)
    boxes = torch.zeros((masks.shape[0], 4), dtype=torch.float32)
    for i, m in enumerate(masks):
        ys, xs = torch.where(m > 0)
        if len(xs):
            boxes[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    return boxes


def _bytes_counts(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
