"""Ground-truth boxes for anchor analysis, in the pixels of the image the RPN sees.

The RPN matches anchors to boxes after the model's input transform has resized the image
(torchvision's ``GeneralizedRCNNTransform``: short side to ``min_size`` unless the long side
would pass ``max_size``) and padded it to a multiple of 32. A box's fit to the anchors only
means something in those pixels, so :func:`load_boxes` reads COCO boxes and applies exactly
that resize, per image; the padded size fixes the anchor grid (see
:mod:`rsiseg.tools.anchor_recall`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from rsiseg.data.coco_index import BOX_TOLERANCE_PX, DataError, DataReport, number_problem, read_coco_json

SIZE_DIVISIBLE = 32  # GeneralizedRCNNTransform.batch_images pads every side to a multiple of this
COCO_SMALL, COCO_MEDIUM = 32.0**2, 96.0**2  # COCO area limits, here on box area in resized pixels
SIZE_BUCKETS = ("small", "medium", "large")


@dataclass(frozen=True)
class ResizeRule:
    """The resize between an image file and the network input.

    Attributes:
        min_size: ``model.min_size``: the short side is scaled to this...
        max_size: ``model.max_size``: ...unless the long side would exceed this.
        pre_max_size: ``data.max_size`` of a training config (longest side first scaled to this,
            by the data pipeline, before the model's resize); None when off.
    """

    min_size: int = 800
    max_size: int = 1333
    pre_max_size: int | None = None

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(H', W')`` of the network input before padding, for an ``height x width`` image."""
        if self.pre_max_size:  # rsiseg.data.transforms.LongestMaxSize rounds, with Python's round
            s = self.pre_max_size / max(height, width)
            height, width = max(1, round(height * s)), max(1, round(width * s))
        # torchvision: interpolate(scale_factor=scale, recompute_scale_factor=True) floors size * scale
        scale = min(self.min_size / min(height, width), self.max_size / max(height, width))
        return math.floor(height * scale), math.floor(width * scale)

    @staticmethod
    def padded_shape(height: int, width: int) -> tuple[int, int]:
        """The batched tensor size: each side rounded up to a multiple of :data:`SIZE_DIVISIBLE`."""
        d = SIZE_DIVISIBLE
        return math.ceil(height / d) * d, math.ceil(width / d) * d


@dataclass
class BoxSet:
    """Boxes of a dataset in network-input pixels, with the image each one lies in.

    Attributes:
        boxes: float64 ``[N, 4]`` xyxy boxes in resized-image pixels.
        image_index: int64 ``[N]``, the row of ``resized`` / ``padded`` of each box's image.
        resized: int64 ``[I, 2]`` resized ``(H', W')`` per image.
        padded: int64 ``[I, 2]`` padded ``(H_pad, W_pad)`` per image (sets the anchor grid).
        file_names: ``I`` image file names, for messages.
        report: crowd, degenerate and repaired boxes, counted by kind.
        cache: per-box values that depend only on the images (the anchor grid), kept for reuse
            across the many configurations of a search.
    """

    boxes: Tensor
    image_index: Tensor
    resized: Tensor
    padded: Tensor
    file_names: list[str]
    report: DataReport
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def num_images(self) -> int:
        return len(self.file_names)

    def subset(self, images: Sequence[int]) -> BoxSet:
        """The boxes of the images ``images`` (row indices), re-indexed in that order."""
        images_t = torch.as_tensor(list(images), dtype=torch.int64)
        remap = torch.full((self.num_images,), -1, dtype=torch.int64)
        remap[images_t] = torch.arange(len(images_t))
        keep = remap[self.image_index] >= 0
        return BoxSet(self.boxes[keep], remap[self.image_index[keep]], self.resized[images_t],
                      self.padded[images_t], [self.file_names[i] for i in images_t.tolist()], self.report)

    def sample_images(self, max_images: int | None, seed: int) -> BoxSet:
        """At most ``max_images`` images drawn without replacement (seeded); all when None or fewer."""
        if max_images is None or max_images >= self.num_images:
            return self
        rows = np.random.default_rng(seed).choice(self.num_images, size=max_images, replace=False)
        return self.subset(sorted(rows.tolist()))


def load_boxes(ann_files: Sequence[str | Path], resize: ResizeRule) -> BoxSet:
    """Read the boxes of one or more COCO instances JSONs, resized as the model resizes images.

    Crowd boxes (``iscrowd=1``: the RPN never matches them), boxes of zero width or height,
    boxes with non-finite or absurd numbers, boxes outside their image, malformed ``bbox`` fields
    and annotations of unknown images are skipped and counted; boxes overhanging the border are
    clipped and counted. Images without boxes count as images.

    Raises:
        DataError: a file is missing or malformed, or an image entry lacks a positive integer
            ``width``/``height`` (the message names the file and field).
    """
    report = DataReport(", ".join(str(f) for f in ann_files))
    boxes: list[list[float]] = []
    index: list[int] = []
    resized: list[tuple[int, int]] = []
    names: list[str] = []
    for ann_file in ann_files:
        raw = read_coco_json(Path(ann_file))
        rows: dict[Any, int] = {}
        for i, img in enumerate(raw["images"]):
            height, width = _image_size(img, i, ann_file)
            rows[img.get("id")] = len(names)
            names.append(str(img.get("file_name", f"images[{i}]")))
            resized.append(resize.resized_shape(height, width))
        sizes = {img.get("id"): (img["height"], img["width"]) for img in raw["images"]}
        for ann in raw["annotations"]:
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            if image_id not in rows:
                report.add("unknown image id", f"{ann_file}: annotation {_ann_id(ann)}")
                continue
            row = rows[image_id]
            box = _checked_box(ann, *sizes[image_id], f"{ann_file}: annotation {_ann_id(ann)}", report)
            if box is not None:
                sy, sx = resized[row][0] / sizes[image_id][0], resized[row][1] / sizes[image_id][1]
                boxes.append([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy])
                index.append(row)
    shapes = torch.tensor(resized, dtype=torch.int64).reshape(-1, 2)
    padded = torch.tensor([ResizeRule.padded_shape(h, w) for h, w in resized], dtype=torch.int64).reshape(-1, 2)
    return BoxSet(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4), torch.tensor(index, dtype=torch.int64),
                  shapes, padded, names, report)


def _image_size(img: Any, i: int, ann_file: str | Path) -> tuple[int, int]:
    if not isinstance(img, dict):
        raise DataError(f"{ann_file}: images[{i}] is not an object")
    for key in ("height", "width"):
        value = img.get(key)
        if type(value) is not int or value <= 0:
            raise DataError(f"{ann_file}: images[{i}] field {key!r} must be a positive integer, got {value!r}")
    return img["height"], img["width"]


def _ann_id(ann: Any) -> str:
    return str(ann.get("id", "?")) if isinstance(ann, dict) else "?"


def _checked_box(ann: dict[str, Any], height: int, width: int, where: str,
                 report: DataReport) -> list[float] | None:
    """The xyxy box of ``ann`` in source pixels, clipped to the image; None (counted) when skipped."""
    if ann.get("iscrowd", 0):
        report.add("crowd box", where)
        return None
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(type(v) in (int, float) for v in bbox)):
        report.add("missing or malformed bbox", where)
        return None
    problem = number_problem({"bbox": bbox}, width, height)
    if problem is not None:
        report.add(problem[0], where)
        return None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        report.add("zero-area box", where)
        return None
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:
        report.add("box outside image", where)
        return None
    tol = BOX_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        report.add("box clipped to image", where)
    return [x1, y1, x2, y2]


def size_buckets(boxes: Tensor) -> Tensor:
    """COCO size bucket per box: int64 ``[N]``, 0 small (area < 32^2), 1 medium (< 96^2), 2 large.

    Args:
        boxes: ``[N, 4]`` xyxy boxes; the area is that of the box, in the pixels given.
    """
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return (area >= COCO_SMALL).long() + (area >= COCO_MEDIUM).long()


def box_statistics(box_set: BoxSet) -> dict[str, Any]:
    """Summary of the resized boxes: counts, size buckets, sqrt-area, width, height and h/w quantiles."""
    b = box_set.boxes
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    counts = torch.bincount(box_set.image_index, minlength=box_set.num_images)
    buckets = torch.bincount(size_buckets(b), minlength=3)
    sides = box_set.resized.double()
    return {
        "images": box_set.num_images,
        "boxes": len(box_set),
        "images_without_boxes": int((counts == 0).sum()),
        "boxes_per_image": _quantiles(counts.double()),
        "size_buckets": {name: int(n) for name, n in zip(SIZE_BUCKETS, buckets)},
        "sqrt_area": _quantiles((w * h).sqrt()),
        "width": _quantiles(w),
        "height": _quantiles(h),
        "ratio_h_over_w": _quantiles(h / w),
        "resized_short_side": _quantiles(sides.min(1).values),
        "resized_long_side": _quantiles(sides.max(1).values),
        "skipped_or_repaired": dict(box_set.report.counts),
    }


QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def _quantiles(values: Tensor) -> dict[str, float]:
    if len(values) == 0:
        return {}
    q = torch.quantile(values.double(), torch.tensor(QUANTILES, dtype=torch.float64))
    names = ["min", "p5", "p25", "median", "p75", "p95", "max"]
    return {"mean": round(float(values.double().mean()), 3)} | {n: round(float(v), 3) for n, v in zip(names, q)}
