"""Cross-tile merge of instance predictions, shared by ``rsiseg data merge`` and tiled prediction.

A scene too large for the model is seen as overlapping tiles (patches). Its detections are
placed in scene pixels as :class:`SceneItem` (a mask cropped to its box plus its scene RLE, never
a scene-sized raster) and merged per class by :func:`merge_scene_items`:

1. **Cut**: a detection whose mask lies within ``border_px`` of an *inner* edge of its tile (an
   edge that is not the scene edge) is marked ``cut``: the tile may show only part of it.
2. **Fuse** (policy ``union``): an instance cut by a tile border shows up as fragments in
   neighbouring tiles. Two same-class items from different tiles are fused (mask union, **max
   score**) when at least one is cut and they agree inside the window both tiles share: their
   intersection covers at least ``fuse_ios`` of the smaller one's part of that window. Requiring
   agreement inside the shared window (rather than any contact) keeps touching neighbours, e.g.
   parked cars, apart. With ``overlap = 0`` tiles share no pixels, so abutting fragments are not
   fused. A fused item is cut only when all its parts were.
3. **Suppress**: the duplicates left by overlapping tiles go through a greedy mask NMS, whole
   items before cut ones (a detection touching an inner border loses to one lying wholly inside
   another tile), then highest score, then larger area. An item is dropped when its mask overlaps a
   kept one's and their mask IoU is ``>= iou_threshold`` or its IoS (intersection over the smaller
   area) is ``>= ios_threshold`` (so masks that share no pixel never suppress each other, even at
   thresholds of 0). Policy ``suppress`` skips step 2.

Each item's outcome depends only on the items linked to it by a chain of overlapping boxes, so
:class:`rsiseg.data.merge_stream.StreamingMerge` can merge a scene band by band as its tiles arrive
and give out the final instances early, with the same result.

``merge_predictions`` is the ``data merge`` entry point: COCO results on the patches of a
``data split`` output, in, and COCO results on the scenes, out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
from pycocotools import mask as mask_utils

from rsiseg.structures import segmentation_to_mask, window_to_rle

Box = tuple[int, int, int, int]  # (x, y, w, h) of a tile window in scene pixels
MERGE_POLICIES = ("union", "suppress")


@dataclass
class SceneItem:
    """One detection placed in its scene.

    Attributes:
        source: id of the tile (patch) it came from; items of one tile are never fused together.
        category_id: its class.
        score: confidence in [0, 1].
        packed: the mask inside its tight box, ``uint8 [h, ceil(w / 8)]`` bit-packed along rows
            (``np.packbits(crop, axis=1)``: a dense scene holds tens of thousands of these).
        width: the box width ``w``; :attr:`crop` unpacks the ``bool [h, w]`` mask.
        x, y: that box's top-left corner in scene pixels.
        rle: compressed RLE of the whole scene (``bytes`` counts), for the mask IoU of the merge.
        window: ``(x, y, w, h)`` of its tile in scene pixels.
        bbox: the ``xywh`` box to report (the model's box in scene pixels, or the mask's box).
        cut: set by the merge: the mask touches an inner border of its tile.
    """

    source: int
    category_id: int
    score: float
    packed: np.ndarray
    width: int
    x: int
    y: int
    rle: dict[str, Any]
    window: Box
    bbox: list[float]
    cut: bool = False
    area: float = field(init=False)

    def __post_init__(self) -> None:
        self.area = float(np.unpackbits(self.packed).sum())  # the padding bits are 0

    @classmethod
    def from_crop(cls, crop: np.ndarray, **fields: Any) -> SceneItem:
        """An item holding ``crop`` (``bool [h, w]``) packed; ``fields`` are the other attributes."""
        return cls(packed=np.packbits(crop, axis=1), width=crop.shape[1], **fields)

    @property
    def crop(self) -> np.ndarray:
        """The mask inside the tight box, ``bool [h, w]``."""
        return np.unpackbits(self.packed, axis=1, count=self.width).astype(bool)

    @property
    def box(self) -> Box:
        """Tight ``(x, y, w, h)`` box of the mask in scene pixels."""
        return self.x, self.y, self.width, self.packed.shape[0]

    def to_result(self, image_id: int) -> dict[str, Any]:
        """This item as a COCO result entry (compressed RLE with ``str`` counts) on ``image_id``."""
        rle = {"size": [int(v) for v in self.rle["size"]], "counts": self.rle["counts"].decode("ascii")}
        return {"image_id": int(image_id), "category_id": int(self.category_id), "score": float(self.score),
                "bbox": [float(v) for v in self.bbox], "area": self.area, "segmentation": rle}


def make_item(local: np.ndarray, x0: int, y0: int, scene_hw: tuple[int, int], *, source: int, category_id: int,
              score: float, window: Box, bbox: list[float] | None = None) -> SceneItem | None:
    """A :class:`SceneItem` from a mask window, cropped to its pixels; None for an empty mask.

    Args:
        local: ``[h, w]`` mask (bool or {0, 1}) covering scene pixels ``[y0:y0 + h, x0:x0 + w]``.
        x0, y0: the window's top-left scene pixel.
        scene_hw: ``(H, W)`` of the scene.
        source, category_id, score, window: see :class:`SceneItem`.
        bbox: ``xywh`` box to report in scene pixels; default the mask's tight box.
    """
    local = np.asarray(local) != 0
    rows, cols = np.flatnonzero(local.any(axis=1)), np.flatnonzero(local.any(axis=0))
    if len(rows) == 0:
        return None
    crop = local[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    x, y = x0 + int(cols[0]), y0 + int(rows[0])
    rle = window_to_rle(crop, x, y, *scene_hw)
    rle["counts"] = rle["counts"].encode("ascii")
    box = [float(x), float(y), float(crop.shape[1]), float(crop.shape[0])]
    return SceneItem.from_crop(crop, source=source, category_id=category_id, score=float(score), x=x, y=y,
                               rle=rle, window=window, bbox=bbox or box)


def merge_scene_items(
    items: Iterable[SceneItem], height: int, width: int, *, policy: str = "union", iou_threshold: float = 0.5,
    ios_threshold: float = 0.7, border_px: int = 2, fuse_ios: float = 0.5, stats: dict[str, int] | None = None,
) -> list[SceneItem]:
    """Merge the tile detections of one ``height x width`` scene (see the module docstring).

    Args:
        items: every tile's detections in scene pixels.
        height, width: scene size.
        policy: ``union`` fuses border-cut fragments before the suppression; ``suppress`` only suppresses.
        iou_threshold: duplicates at mask IoU ``>=`` this are suppressed.
        ios_threshold: duplicates at intersection over the smaller area ``>=`` this are suppressed.
        border_px: a mask within this many pixels of an inner tile edge counts as cut by it.
        fuse_ios: fragments are fused when their intersection covers this fraction of the smaller
            one's part of the window their tiles share.
        stats: if given, ``fused`` and ``suppressed`` are added to it.

    Returns:
        The kept items, per class in suppression order (whole first, then by score).
    """
    if policy not in MERGE_POLICIES:
        raise ValueError(f"merge policy must be one of {MERGE_POLICIES}, got {policy!r}")
    by_class: dict[int, list[SceneItem]] = defaultdict(list)
    for item in items:
        item.cut = _touches_inner_border(item, height, width, border_px)
        by_class[item.category_id].append(item)
    counts = stats if stats is not None else {}
    kept = []
    for _, group in sorted(by_class.items()):
        if policy == "union":
            fused = _fuse_group(group, fuse_ios)
            counts["fused"] = counts.get("fused", 0) + len(group) - len(fused)
            group = fused
        survivors = _nms(group, iou_threshold, ios_threshold)
        counts["suppressed"] = counts.get("suppressed", 0) + len(group) - len(survivors)
        kept += survivors
    return kept


def _touches_inner_border(item: SceneItem, height: int, width: int, border_px: int) -> bool:
    bx, by, bw, bh = item.box
    wx, wy, ww, wh = item.window
    return ((wx > 0 and bx - wx <= border_px)
            or (wy > 0 and by - wy <= border_px)
            or (wx + ww < width and wx + ww - (bx + bw) <= border_px)
            or (wy + wh < height and wy + wh - (by + bh) <= border_px))


def _intersect(a: Box, b: Box) -> Box | None:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    return (x1, y1, x2 - x1, y2 - y1) if x2 > x1 and y2 > y1 else None


def _area_in(item: SceneItem, window: Box) -> float:
    """Mask pixels of ``item`` inside ``window`` (scene pixels)."""
    part = _intersect(item.box, window)
    if part is None:
        return 0.0
    x, y, w, h = part
    return float(item.crop[y - item.y:y - item.y + h, x - item.x:x - item.x + w].sum())


def box_neighbours(items: list[SceneItem]) -> list[np.ndarray]:
    """For each item, the indices of the other items whose box overlaps its box with positive area.

    One bulk query of a shapely STRtree, so the cost follows the overlapping pairs, not ``N^2``.
    """
    boxes = np.array([it.box for it in items], dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]
    geoms = shapely.box(x1, y1, x2, y2)
    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    strict = ((left != right) & (x1[left] < x2[right]) & (x1[right] < x2[left])
              & (y1[left] < y2[right]) & (y1[right] < y2[left]))  # touching edges do not count
    left, right = left[strict], right[strict]
    order = np.argsort(left, kind="stable")
    return np.split(right[order], np.searchsorted(left[order], np.arange(1, len(items))))


def _fuse_group(items: list[SceneItem], fuse_ios: float) -> list[SceneItem]:
    """Fuse the border-cut fragments of one scene and class."""
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    neighbours = box_neighbours(items)
    for i in [k for k, it in enumerate(items) if it.cut]:
        a = items[i]
        for j in neighbours[i]:
            b = items[j]
            if b.source == a.source or (b.cut and j < i) or find(i) == find(j):
                continue
            shared = _intersect(a.window, b.window)
            if shared is None:
                continue
            inter = float(mask_utils.area(mask_utils.merge([a.rle, b.rle], intersect=True)))
            if inter > 0 and inter >= fuse_ios * min(_area_in(a, shared), _area_in(b, shared)):
                parent[find(j)] = find(i)
    groups: dict[int, list[SceneItem]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[find(i)].append(it)
    return [members[0] if len(members) == 1 else _union(members) for members in groups.values()]


def _union(members: list[SceneItem]) -> SceneItem:
    """One item of the union of ``members``' masks, with their best score."""
    x0, y0 = min(m.box[0] for m in members), min(m.box[1] for m in members)
    x1 = max(m.box[0] + m.box[2] for m in members)
    y1 = max(m.box[1] + m.box[3] for m in members)
    crop = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for m in members:
        mx, my, mw, mh = m.box
        crop[my - y0:my - y0 + mh, mx - x0:mx - x0 + mw] |= m.crop
    box = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    return SceneItem.from_crop(crop, source=members[0].source, category_id=members[0].category_id,
                               score=max(m.score for m in members), x=x0, y=y0,
                               rle=mask_utils.merge([m.rle for m in members], intersect=False),
                               window=members[0].window, bbox=box, cut=all(m.cut for m in members))


def _nms(items: list[SceneItem], iou_threshold: float, ios_threshold: float) -> list[SceneItem]:
    """Greedy mask NMS by IoU or IoS: whole before cut, then highest score, then largest area.

    Only items whose boxes overlap are compared, so memory follows the overlapping pairs.
    """
    items = sorted(items, key=lambda it: (it.cut, -it.score, -it.area))
    neighbours = box_neighbours(items)
    areas = np.array([it.area for it in items])
    suppressed = np.zeros(len(items), dtype=bool)
    kept = []
    for i, item in enumerate(items):
        if suppressed[i]:
            continue
        kept.append(item)
        later = neighbours[i][neighbours[i] > i]
        later = later[~suppressed[later]]
        if len(later) == 0:
            continue
        iou = np.asarray(mask_utils.iou([items[j].rle for j in later], [item.rle], [0]), dtype=np.float64)[:, 0]
        inter = iou * (areas[later] + item.area) / (1.0 + iou)
        ios = inter / np.maximum(np.minimum(areas[later], item.area), 1.0)
        suppressed[later[((iou >= iou_threshold) | (ios >= ios_threshold)) & (inter > 0)]] = True
    return kept


def _scene_entries(patches_coco: dict[str, Any]) -> tuple[dict[int, dict], dict[int, dict]]:
    """Patch entries by id and scene entries by id (scene size = extent of its patches)."""
    patches = {im["id"]: im for im in patches_coco["images"]}
    scenes: dict[int, dict[str, Any]] = {}
    for im in patches.values():
        for key in ("scene_id", "scene_file", "offset"):
            if key not in im:
                raise ValueError(f"patch image {im.get('id')} has no {key!r}: is this the output of `data split`?")
        x1, y1 = im["offset"]
        scene = scenes.setdefault(im["scene_id"], {"id": im["scene_id"], "file_name": im["scene_file"],
                                                   "height": 0, "width": 0})
        scene["height"] = max(scene["height"], y1 + im["height"])
        scene["width"] = max(scene["width"], x1 + im["width"])
    return patches, scenes


def _place(results: list[dict], patches: dict[int, dict], scenes: dict[int, dict],
           stats: dict[str, int]) -> dict[int, list[SceneItem]]:
    """Patch results as scene items, by scene id."""
    placed: dict[int, list[SceneItem]] = defaultdict(list)
    for k, res in enumerate(results):
        im = patches.get(res["image_id"])
        if im is None:
            raise ValueError(f"prediction {k}: image_id {res['image_id']} is not a patch of the split JSON")
        scene = scenes[im["scene_id"]]
        x1, y1 = (int(v) for v in im["offset"])
        mask = segmentation_to_mask(res["segmentation"], im["height"], im["width"])
        h, w = min(mask.shape[0], scene["height"] - y1), min(mask.shape[1], scene["width"] - x1)
        bbox = [float(v) + off for v, off in zip(res["bbox"], (x1, y1, 0, 0))] if res.get("bbox") else None
        item = make_item(mask[:h, :w], x1, y1, (scene["height"], scene["width"]), source=im["id"],
                         category_id=res["category_id"], score=float(res.get("score", 1.0)),
                         window=(x1, y1, int(im["width"]), int(im["height"])), bbox=bbox)
        if item is None:
            stats["empty"] += 1
        else:
            placed[im["scene_id"]].append(item)
    return placed


def merge_predictions(
    patch_results: list[dict[str, Any]], patches_coco: dict[str, Any], iou_threshold: float = 0.5,
    ios_threshold: float = 0.7, border_px: int = 2, *, fuse_ios: float = 0.5, policy: str = "union",
    scene_images: list[dict[str, Any]] | None = None, stats: dict[str, int] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Turn COCO results on patch images into COCO results on their scenes.

    Args:
        patch_results: COCO results ``{image_id, category_id, score, segmentation, bbox?}`` on patch
            image ids; segmentations are RLE (or polygons) in patch pixels.
        patches_coco: the ``data split`` JSON; its image entries carry ``scene_id``, ``scene_file``,
            ``offset = [x1, y1]``, ``height`` and ``width``.
        iou_threshold, ios_threshold, border_px, fuse_ios, policy: see :func:`merge_scene_items`.
        scene_images: scene entries with the true ``height``/``width``; by default the scene size is
            the extent of its patches (short when the split dropped the last row/column of patches).
        stats: if given, filled with counts ``in``, ``empty``, ``fused``, ``suppressed``, ``out``.

    Returns:
        ``(results, images)``: scene-level COCO results (``segmentation`` compressed RLE with
        ``str`` counts, ``bbox`` xywh, ``area``) on scene ids, and the scene image entries.
    """
    counts: dict[str, int] = defaultdict(int, {"in": len(patch_results), "fused": 0, "suppressed": 0})
    patches, scenes = _scene_entries(patches_coco)
    for entry in scene_images or []:
        if entry["id"] in scenes:
            scenes[entry["id"]].update(height=int(entry["height"]), width=int(entry["width"]))
    results = []
    for scene_id, items in sorted(_place(patch_results, patches, scenes, counts).items()):
        scene = scenes[scene_id]
        kept = merge_scene_items(items, scene["height"], scene["width"], policy=policy, iou_threshold=iou_threshold,
                                 ios_threshold=ios_threshold, border_px=border_px, fuse_ios=fuse_ios, stats=counts)
        results += [item.to_result(scene_id) for item in kept]
    counts["out"] = len(results)
    if stats is not None:
        stats.update(counts)
    return results, sorted(scenes.values(), key=lambda s: s["id"])
