"""How well an anchor configuration covers the ground truth, on the anchor grid the RPN uses.

The anchors are torchvision's (:class:`~torchvision.models.detection.anchor_utils.AnchorGenerator`,
built by :func:`rsiseg.models.layers.rcnn_assembly.build_anchor_generator`): per level, ``sizes x ratios``
cell anchors (ratio = height / width, half-sides rounded) centred at ``(j * stride_x, i * stride_y)``
for every cell ``(i, j)`` of the feature map, where ``stride = padded image size // grid size``
(so P6 of an 800 px input has 13 cells and stride 61, not 64).

The best IoU of a box over that grid needs no ``boxes x anchors`` matrix: for one cell anchor
shape the overlap along x is a non-increasing function of ``|anchor centre x - box centre x|``
alone, and likewise along y, so the intersection, hence the IoU, is largest at the grid centre
nearest the box centre on each axis. :func:`best_anchor_iou` evaluates only that anchor per
shape and level (exact, not an approximation); :func:`dense_best_anchor_iou` is the brute-force
reference over every anchor, used to verify it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from rsiseg.config import ModelConfig
from rsiseg.models.layers.box_matching import BoxPairs, LocalMatcher
from rsiseg.models.layers.rcnn_assembly import FPN_LEVELS, build_anchor_generator
from rsiseg.tools.anchor_boxes import SIZE_BUCKETS, BoxSet, size_buckets

THRESHOLDS = (0.5, 0.7, 0.75)
_DENSE_CHUNK = 1 << 22  # IoU values per chunk of the brute-force reference


@dataclass
class AnchorConfig:
    """Anchor sizes and ratios as ``model.anchor_sizes`` / ``model.anchor_ratios`` take them.

    Attributes:
        name: label in tables.
        sizes: one list of sizes (pixels, ints: the model casts them) per level, P2 first.
        ratios: height / width; one list shared by every level, or one list per level.
    """

    name: str
    sizes: list[list[int]]
    ratios: list[list[float]] = field(default_factory=lambda: [[0.5, 1.0, 2.0]])

    def __post_init__(self) -> None:
        self.sizes = [[int(s) for s in level] for level in self.sizes]
        self.ratios = [[float(r) for r in level] for level in self.ratios]
        if not 1 <= len(self.sizes) <= FPN_LEVELS:
            raise ValueError(f"anchors {self.name!r}: need 1 to {FPN_LEVELS} levels of sizes, got {len(self.sizes)}")
        if len(self.ratios) not in (1, len(self.sizes)):
            raise ValueError(f"anchors {self.name!r}: anchor_ratios needs 1 or {len(self.sizes)} lists")
        if any(s <= 0 for level in self.sizes for s in level) or any(r <= 0 for level in self.ratios for r in level):
            raise ValueError(f"anchors {self.name!r}: sizes and ratios must be positive")
        counts = {len(s) * len(r) for s, r in zip(self.sizes, self.level_ratios())}
        if len(counts) != 1 or 0 in counts:  # torchvision's RPNHead predicts one count for every level
            raise ValueError(f"anchors {self.name!r}: every level needs the same number of anchors per "
                             f"location (sizes x ratios), got {sorted(counts)}")

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    @property
    def per_location(self) -> int:
        """Anchors per feature-map location (the same on every level)."""
        return len(self.sizes[0]) * len(self.level_ratios()[0])

    def level_ratios(self) -> list[list[float]]:
        return self.ratios if len(self.ratios) == self.num_levels else self.ratios * self.num_levels

    def generator(self) -> AnchorGenerator:
        """The model's anchor generator for these anchors."""
        cfg = ModelConfig(anchor_sizes=self.sizes, anchor_ratios=self.ratios)
        return build_anchor_generator(cfg, num_levels=self.num_levels)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "anchor_sizes": self.sizes, "anchor_ratios": self.ratios,
                "anchors_per_location": self.per_location}


def feature_grid(height: int, width: int, num_levels: int = FPN_LEVELS) -> list[tuple[int, int]]:
    """Feature-map sizes ``(H_l, W_l)`` of P2, P3, ... for a padded ``height x width`` input.

    Every stride-2 step of the ResNet/FPN path (convolutions with padding ``k // 2``, FPN's
    ``max_pool2d(1, 2)`` for P6) maps ``n`` to ``ceil(n / 2)``; P2 is two steps down.
    """
    grids = []
    for level in range(num_levels):
        steps = level + 2
        h, w = height, width
        for _ in range(steps):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        grids.append((h, w))
    return grids


def level_grids(padded: Tensor, num_levels: int) -> Tensor:
    """int64 ``[I, L, 4]``: ``(H_l, W_l, stride_y, stride_x)`` per image and level, strides as torchvision."""
    shapes, inverse = torch.unique(padded.reshape(-1, 2), dim=0, return_inverse=True)  # few distinct sizes
    rows = [[(gh, gw, height // gh, width // gw) for gh, gw in feature_grid(height, width, num_levels)]
            for height, width in shapes.tolist()]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, num_levels, 4)[inverse]


def best_anchor_iou(box_set: BoxSet, config: AnchorConfig) -> tuple[Tensor, Tensor]:
    """The highest IoU of each box with any anchor of any level, on its image's anchor grid.

    Computed in numpy float64: a few element-wise operations on ``[N, K]`` arrays, which torch's
    thread pool only slows down (20x on a busy 2-core machine).

    Returns:
        ``best`` float64 ``[N]`` in [0, 1] and ``level`` int64 ``[N]`` (0 = P2) of the anchor
        that reaches it (the finer level on ties).
    """
    boxes = box_set.boxes.numpy()
    best = np.zeros(len(boxes))
    level = np.zeros(len(boxes), dtype=np.int64)
    if len(boxes):
        key = f"grids{config.num_levels}"
        if key not in box_set.cache:
            grids = level_grids(box_set.padded, config.num_levels)[box_set.image_index]
            box_set.cache[key] = grids.numpy().astype(np.float64)  # [N, L, 4]
        grids = box_set.cache[key]
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # [N, 2] as (x, y)
        for lvl, cell in enumerate(config.generator().cell_anchors):
            cell = cell.double().numpy()  # [K, 4] xyxy around the origin, rounded as torchvision rounds
            gh, gw, sy, sx = grids[:, lvl].T
            ix = _nearest(centre[:, 0], (cell[:, 0] + cell[:, 2]) / 2, sx, gw)  # [N, K]
            iy = _nearest(centre[:, 1], (cell[:, 1] + cell[:, 3]) / 2, sy, gh)
            shift = np.stack([ix * sx[:, None], iy * sy[:, None]] * 2, axis=-1)  # [N, K, 4]
            iou = _paired_iou(boxes[:, None, :], cell[None] + shift).max(axis=1)
            level = np.where(iou > best, lvl, level)
            best = np.maximum(iou, best)
    return torch.from_numpy(best), torch.from_numpy(level)


def _nearest(centre: np.ndarray, offset: np.ndarray, stride: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Index ``[N, K]`` of the grid centre nearest ``centre - offset`` along one axis, within the grid."""
    index = np.round((centre[:, None] - offset[None, :]) / stride[:, None])  # half-way: either is as good
    return np.minimum(np.maximum(index, 0), (cells - 1)[:, None])


def _paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes ``a`` and ``b`` element by element (broadcast), as torchvision's box_iou."""
    wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter)


def image_anchors(box_set: BoxSet, image: int, generator: AnchorGenerator) -> Tensor:
    """Every anchor of image row ``image``, float32 ``[A, 4]`` xyxy, from torchvision's own forward pass."""
    height, width = box_set.padded[image].tolist()
    levels = len(generator.cell_anchors)
    images = ImageList(torch.zeros(1, 1, height, width), [tuple(box_set.resized[image].tolist())])
    features = [torch.zeros(1, 1, gh, gw) for gh, gw in feature_grid(height, width, levels)]
    return generator(images, features)[0]


def dense_best_anchor_iou(box_set: BoxSet, config: AnchorConfig, images: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Brute-force reference of :func:`best_anchor_iou`: ``box_iou`` against every anchor.

    Returns:
        The row indices ``[n]`` of the boxes of ``images`` (in ``box_set``) and their best IoU
        float32 ``[n]``.
    """
    generator = config.generator()
    rows, values = [], []
    for image in images:
        idx = torch.nonzero(box_set.image_index == image)[:, 0]
        if len(idx) == 0:
            continue
        anchors = image_anchors(box_set, image, generator)
        gt = box_set.boxes[idx].float()
        step = max(1, _DENSE_CHUNK // len(anchors))
        values += [box_iou(gt[i: i + step], anchors).max(dim=1).values for i in range(0, len(gt), step)]
        rows.append(idx)
    if not rows:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    return torch.cat(rows), torch.cat(values)


def rpn_positive_share(box_set: BoxSet, config: AnchorConfig, images: Sequence[int],
                       fg_iou: float = 0.7, bg_iou: float = 0.3) -> float | None:
    """Share of boxes that own at least one positive anchor under the RPN's IoU rule.

    Matches every anchor of each image with the model's own matcher (torchvision's
    :class:`Matcher` rules): an anchor goes to its highest-IoU box and is positive when that IoU
    is at least ``fg_iou``. Unlike :func:`best_anchor_iou` this counts the competition between
    overlapping boxes; the low-quality fallback (each box's best anchor) is left out, since it
    would make every box positive. None when ``images`` hold no box.
    """
    generator = config.generator()
    matcher = LocalMatcher(fg_iou, bg_iou, allow_low_quality_matches=False)
    owned = total = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small per-image problems: a thread pool costs more than it gives
    try:
        for image in images:
            gt = box_set.boxes[box_set.image_index == image].float()
            if len(gt) == 0:
                continue
            matches = matcher(BoxPairs(gt, image_anchors(box_set, image, generator)))
            owned += int((torch.bincount(matches[matches >= 0], minlength=len(gt)) > 0).sum())
            total += len(gt)
    finally:
        torch.set_num_threads(threads)
    return owned / total if total else None


def anchor_recall(box_set: BoxSet, config: AnchorConfig, thresholds: Sequence[float] = THRESHOLDS,
                  bucket_threshold: float = 0.5) -> dict[str, Any]:
    """Recall of the ground truth by the anchors: the share of boxes whose best anchor IoU >= t.

    Args:
        box_set: boxes in network-input pixels (:func:`rsiseg.tools.anchor_boxes.load_boxes`).
        config: the anchors.
        thresholds: IoU thresholds ``t``.
        bucket_threshold: the threshold of the per-size (COCO small / medium / large) recalls.

    Returns:
        ``{"recall@t": ..., "recall@<bucket_threshold>_<bucket>": ... (None for an empty bucket),
        "mean_best_iou", "best_level_share": {"P2": ...}, "boxes"}`` plus :meth:`AnchorConfig.to_dict`.
    """
    best, level = best_anchor_iou(box_set, config)
    out: dict[str, Any] = config.to_dict() | {"boxes": len(best)}
    for t in thresholds:
        out[f"recall@{t:g}"] = _share(best >= t)
    buckets = size_buckets(box_set.boxes)
    for b, name in enumerate(SIZE_BUCKETS):
        out[f"recall@{bucket_threshold:g}_{name}"] = _share(best[buckets == b] >= bucket_threshold)
    out["mean_best_iou"] = float(best.mean()) if len(best) else None
    shares = torch.bincount(level, minlength=config.num_levels).double() / max(1, len(level))
    out["best_level_share"] = {f"P{i + 2}": round(float(s), 4) for i, s in enumerate(shares)}
    return out


def _share(hits: Tensor) -> float | None:
    return float(hits.double().mean()) if len(hits) else None
