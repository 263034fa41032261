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
    """Tight xyxy boxes ``[N, 4]`` float of ``[N, H, W]`` masks, on their device; pixel-edge convention
    (x2 = last col + 1); an empty mask gets zeros."""
    if masks.numel() == 0:
        return torch.zeros((masks.shape[0], 4), dtype=torch.float32, device=masks.device)
    filled = masks > 0
    rows, cols = filled.any(dim=2), filled.any(dim=1)
    height, width = masks.shape[-2:]
    y_idx = torch.arange(height, device=masks.device)
    x_idx = torch.arange(width, device=masks.device)
    big = max(height, width)
    x1 = torch.where(cols, x_idx, big).amin(dim=1)
    y1 = torch.where(rows, y_idx, big).amin(dim=1)
    x2 = torch.where(cols, x_idx + 1, 0).amax(dim=1)
    y2 = torch.where(rows, y_idx + 1, 0).amax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return torch.where(cols.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


def _bytes_counts(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def rle_counts(rle: dict[str, Any]) -> np.ndarray:
    """Run lengths ``int64 [R]`` of a COCO RLE (compressed or not), column-major, starting with a 0-run.

    The compressed ``counts`` string is decoded with numpy (pycocotools' LEB128-like format:
    5 bits per character, a continuation bit, a sign bit, and each count from the third on
    stored relative to the one two places before), so no full-size raster is made.
    """
    counts = rle["counts"]
    if isinstance(counts, list):
        return np.asarray(counts, dtype=np.int64)
    chars = np.frombuffer(counts.encode("ascii") if isinstance(counts, str) else counts, dtype=np.uint8)
    if len(chars) == 0:
        return np.zeros(0, dtype=np.int64)
    c = chars.astype(np.int64) - 48
    last = (c & 0x20) == 0  # the final character of each value
    group = np.concatenate([[0], np.cumsum(last)[:-1]])
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    shift = 5 * (np.arange(len(c)) - starts[group])
    values = np.bincount(group, weights=(c & 0x1F) << shift).astype(np.int64)
    ends = np.flatnonzero(last)
    chunks = ends - starts + 1
    negative = (c[ends] & 0x10) != 0
    values[negative] -= np.left_shift(np.int64(1), 5 * chunks[negative])
    values[3::2] = np.cumsum(np.concatenate([values[1:2], values[3::2]]))[1:]
    values[4::2] = np.cumsum(values[2::2])[1:]
    return values


def rle_to_window(rle: dict[str, Any], x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """The part ``[y0:y1, x0:x1]`` of an RLE mask as ``uint8 [y1 - y0, x1 - x0]``.

    Only the columns ``x0..x1`` are expanded (``H x (x1 - x0)`` values), never the whole image.
    """
    height, width = (int(v) for v in rle["size"])
    if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
        raise ValueError(f"window x {x0}..{x1}, y {y0}..{y1} is outside the {width}x{height} RLE")
    ends = np.cumsum(rle_counts(rle))
    starts = np.concatenate([[0], ends[:-1]])
    lo, hi = x0 * height, x1 * height
    run_starts, run_ends = np.clip(starts[1::2], lo, hi) - lo, np.clip(ends[1::2], lo, hi) - lo
    edges = np.zeros(hi - lo + 1, dtype=np.int32)
    np.add.at(edges, run_starts, 1)
    np.add.at(edges, run_ends, -1)
    columns = np.cumsum(edges[:-1]).astype(np.uint8).reshape(x1 - x0, height)
    return np.ascontiguousarray(columns.T[y0:y1])


def window_to_rle(local: np.ndarray, x0: int, y0: int, height: int, width: int) -> dict[str, Any]:
    """Compressed, JSON-ready RLE of an ``H x W`` image that is zero outside one window.

    Args:
        local: ``[h, w]`` mask (bool or {0, 1}) of the window ``[y0:y0+h, x0:x0+w]``, which must
            lie inside the image.
        x0, y0: the window's top-left pixel.
        height, width: the image size H, W.

    Returns:
        ``{"size": [H, W], "counts": str}``, identical to encoding the full-size mask; built from
        the window's transitions alone, so the cost grows with the window, not the image.
    """
    h, w = local.shape
    if not (0 <= x0 and x0 + w <= width and 0 <= y0 and y0 + h <= height):
        raise ValueError(f"window {w}x{h} at ({x0}, {y0}) is outside the {width}x{height} image")
    padded = np.zeros((w, h + 2), dtype=np.int8)
    padded[:, 1:-1] = local.T != 0
    cols, rows = np.nonzero(np.diff(padded, axis=1))  # column-major order, as COCO RLE counts
    positions = (x0 + cols).astype(np.int64) * height + (y0 + rows)
    # A run reaching the bottom of one column and the top of the next gives the same position twice.
    positions, repeats = np.unique(positions, return_counts=True)
    positions = positions[(repeats == 1) & (positions < height * width)]
    counts = np.diff(np.concatenate([[0], positions, [height * width]]))
    height, width = int(height), int(width)
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def rle_problem(segm: dict[str, Any], height: int, width: int) -> str | None:
    """What is wrong with an RLE segmentation for an ``H x W`` image, or None when it is usable.

    Checked before pycocotools sees it (it crashes or overflows on malformed counts): ``size`` is
    ``[H, W]``; ``counts`` is a string or a list of non-negative integers; the runs cover exactly
    ``H * W`` pixels.
    """
    size = segm.get("size")
    if not isinstance(size, list) or [v for v in size if type(v) is int] != [height, width]:
        return f"RLE size {size!r} is not the image size [{height}, {width}]"
    counts = segm.get("counts")
    if isinstance(counts, list):
        if not all(type(v) is int and 0 <= v < 2**32 for v in counts):
            return "RLE counts must be non-negative integers below 2**32"
    elif not isinstance(counts, (str, bytes)):
        return f"RLE counts of type {type(counts).__name__} (want a string or a list of integers)"
    try:
        runs = rle_counts(segm)
    except (UnicodeError, ValueError, OverflowError) as err:
        return f"RLE counts cannot be decoded ({err})"
    if (runs < 0).any() or int(runs.sum()) != height * width:
        return f"RLE runs cover {int(runs.sum())} pixels, not {height} x {width} = {height * width}"
    return None
