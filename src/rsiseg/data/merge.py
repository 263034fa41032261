"""Merge patch-level predictions back into scene coordinates (the inverse of ``tiling.split_coco``).

Three steps, per scene:

1. **Place**: every patch result is shifted by its patch ``offset``; its mask becomes a scene-sized
   compressed RLE built from a column strip (``H x bbox width``), never a full ``H x W`` canvas.
2. **Fuse**: an instance cut by a patch border shows up as fragments in neighbouring patches.
   Two same-class results from different patches are fused (mask union, **max score**) when at
   least one touches its patch's *inner* border (within ``border_px`` of an edge that is not the
   scene edge) and they agree inside the window both patches share: their intersection covers
   at least ``fuse_ios`` of the smaller one's part of that shared window. Requiring agreement
   inside the shared window (rather than any contact) keeps touching neighbours, e.g. parked
   cars, apart. With ``overlap = 0`` patches share no pixels, so abutting fragments are not fused.
3. **Suppress**: the duplicates left by overlapping patches go through a greedy mask NMS per
   class, highest score first (ties: larger area first): a result is dropped when its mask IoU
   with a kept one is ``>= iou_threshold`` or its IoS (intersection over the smaller area) is
   ``>= ios_threshold``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from rsiseg.structures import segmentation_to_mask

Box = tuple[int, int, int, int]  # (x, y, w, h) of a patch window in scene pixels


def _runs(flat: np.ndarray) -> list[int]:
    """Uncompressed RLE counts (zeros first) of a 1-D {0, 1} array."""
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [len(flat)]])).tolist()
    return [0, *runs] if flat[0] else runs


def paste_rle(mask: np.ndarray, x1: int, y1: int, height: int, width: int) -> dict[str, Any] | None:
    """Compressed RLE of an ``H x W`` scene holding ``mask`` (``uint8[h, w]``) at offset ``(x1, y1)``.

    Only the columns spanned by the mask are materialised (``uint8[H, bbox_w]``), because COCO
    RLE runs column-major: the columns left and right of the mask are single runs of zeros.
    Returns None for an empty mask. ``counts`` is ``bytes``.
    """
    cols = np.flatnonzero(mask.any(axis=0))
    if len(cols) == 0:
        return None
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    h = mask.shape[0]
    strip = np.zeros((height, c1 - c0), dtype=np.uint8)
    strip[y1:y1 + h] = mask[: height - y1, c0:c1]
    counts = _runs(strip.ravel(order="F"))
    counts[0] += (x1 + c0) * height
    tail = (width - x1 - c1) * height
    if len(counts) % 2:  # odd number of runs: the last one is zeros
        counts[-1] += tail
    else:
        counts.append(tail)
    return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)


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
           stats: dict[str, int]) -> list[dict[str, Any]]:
    """Patch results as scene items with ``rle`` (bytes counts), ``area``, ``box`` and ``window``."""
    placed = []
    for k, res in enumerate(results):
        im = patches.get(res["image_id"])
        if im is None:
            raise ValueError(f"prediction {k}: image_id {res['image_id']} is not a patch of the split JSON")
        scene = scenes[im["scene_id"]]
        x1, y1 = (int(v) for v in im["offset"])
        mask = segmentation_to_mask(res["segmentation"], im["height"], im["width"])
        rle = paste_rle(mask, x1, y1, scene["height"], scene["width"])
        if rle is None:
            stats["empty"] += 1
            continue
        bx, by, bw, bh = res.get("bbox") or mask_utils.toBbox(rle).tolist()
        placed.append({
            "scene_id": im["scene_id"], "patch_id": im["id"], "category_id": res["category_id"],
            "score": float(res.get("score", 1.0)), "rle": rle, "area": float(mask_utils.area(rle)),
            "bbox": [float(bx + (x1 if res.get("bbox") else 0)), float(by + (y1 if res.get("bbox") else 0)),
                     float(bw), float(bh)],
            "box": mask_utils.toBbox(rle).tolist(), "window": (x1, y1, int(im["width"]), int(im["height"])),
        })
    return placed


def _touches_inner_border(item: dict, scene: dict, border_px: int) -> bool:
    bx, by, bw, bh = item["box"]
    wx, wy, ww, wh = item["window"]
    return ((wx > 0 and bx - wx <= border_px)
            or (wy > 0 and by - wy <= border_px)
            or (wx + ww < scene["width"] and wx + ww - (bx + bw) <= border_px)
            or (wy + wh < scene["height"] and wy + wh - (by + bh) <= border_px))


def _intersect(a: Box, b: Box) -> Box | None:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    return (x1, y1, x2 - x1, y2 - y1) if x2 > x1 and y2 > y1 else None


def _area_in(rle: dict, box: Box) -> float:
    h, w = rle["size"]
    box_rle = mask_utils.frPyObjects(np.array([box], dtype=np.float64), h, w)[0]
    return float(mask_utils.area(mask_utils.merge([rle, box_rle], intersect=True)))


def _fuse_group(items: list[dict], scene: dict, border_px: int, fuse_ios: float) -> tuple[list[dict], int]:
    """Fuse border-cut fragments of one scene and class; returns the new items and the fusions made."""
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    boxes = np.array([it["box"] for it in items], dtype=np.float64).reshape(-1, 4)
    border = [_touches_inner_border(it, scene, border_px) for it in items]
    for i in np.flatnonzero(border):
        a = items[i]
        hit = ((boxes[:, 0] < a["box"][0] + a["box"][2]) & (boxes[:, 0] + boxes[:, 2] > a["box"][0])
               & (boxes[:, 1] < a["box"][1] + a["box"][3]) & (boxes[:, 1] + boxes[:, 3] > a["box"][1]))
        for j in np.flatnonzero(hit):
            b = items[j]
            if b["patch_id"] == a["patch_id"] or (border[j] and j < i) or find(i) == find(j):
                continue
            shared = _intersect(a["window"], b["window"])
            if shared is None:
                continue
            inter = float(mask_utils.area(mask_utils.merge([a["rle"], b["rle"]], intersect=True)))
            smaller = min(_area_in(a["rle"], shared), _area_in(b["rle"], shared))
            if inter > 0 and inter >= fuse_ios * smaller:
                parent[find(j)] = find(i)
    groups: dict[int, list[dict]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[find(i)].append(it)
    fused = []
    for members in groups.values():
        if len(members) == 1:
            fused.append(members[0])
            continue
        rle = mask_utils.merge([m["rle"] for m in members], intersect=False)
        box = mask_utils.toBbox(rle).tolist()
        fused.append({**members[0], "score": max(m["score"] for m in members), "rle": rle,
                      "area": float(mask_utils.area(rle)), "box": box, "bbox": box})
    return fused, len(items) - len(fused)


def _nms(items: list[dict], iou_threshold: float, ios_threshold: float) -> list[dict]:
    """Greedy mask NMS by IoU or IoS, highest score (then largest area) first."""
    items = sorted(items, key=lambda it: (-it["score"], -it["area"]))
    if len(items) < 2:
        return items
    rles = [it["rle"] for it in items]
    iou = np.asarray(mask_utils.iou(rles, rles, [0] * len(rles)), dtype=np.float64)
    areas = np.array([it["area"] for it in items])
    inter = iou * (areas[:, None] + areas[None, :]) / (1.0 + iou)
    ios = inter / np.maximum(np.minimum(areas[:, None], areas[None, :]), 1.0)
    dup = (iou >= iou_threshold) | (ios >= ios_threshold)
    suppressed = np.zeros(len(items), dtype=bool)
    kept = []
    for i in range(len(items)):
        if suppressed[i]:
            continue
        kept.append(items[i])
        suppressed |= dup[i]
    return kept


def merge_predictions(
    patch_results: list[dict[str, Any]], patches_coco: dict[str, Any], iou_threshold: float = 0.5,
    ios_threshold: float = 0.7, border_px: int = 2, *, fuse_ios: float = 0.5,
    scene_images: list[dict[str, Any]] | None = None, stats: dict[str, int] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Turn COCO results on patch images into COCO results on their scenes.

    Args:
        patch_results: COCO results ``{image_id, category_id, score, segmentation, bbox?}`` on patch
            image ids; segmentations are RLE (or polygons) in patch pixels.
        patches_coco: the ``data split`` JSON; its image entries carry ``scene_id``, ``scene_file``,
            ``offset = [x1, y1]``, ``height`` and ``width``.
        iou_threshold: duplicates at mask IoU ``>=`` this are suppressed.
        ios_threshold: duplicates at intersection over the smaller area ``>=`` this are suppressed.
        border_px: a mask within this many pixels of an inner patch edge counts as cut by it.
        fuse_ios: fragments are fused when their intersection covers this fraction of the smaller
            one's part of the window their patches share.
        scene_images: scene entries with the true ``height``/``width``; by default the scene size is
            the extent of its patches (short when the split dropped the last row/column of patches).
        stats: if given, filled with counts ``in``, ``empty``, ``fused``, ``suppressed``, ``out``.

    Returns:
        ``(results, images)``: scene-level COCO results (``segmentation`` compressed RLE with
        ``str`` counts, ``bbox`` xywh, ``area``) on scene ids, and the scene image entries.
    """
    counts: dict[str, int] = defaultdict(int, {"in": len(patch_results)})
    patches, scenes = _scene_entries(patches_coco)
    for entry in scene_images or []:
        if entry["id"] in scenes:
            scenes[entry["id"]].update(height=int(entry["height"]), width=int(entry["width"]))
    groups: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for item in _place(patch_results, patches, scenes, counts):
        groups[(item["scene_id"], item["category_id"])].append(item)
    results = []
    for (scene_id, _), items in sorted(groups.items()):
        fused, n_fused = _fuse_group(items, scenes[scene_id], border_px, fuse_ios)
        kept = _nms(fused, iou_threshold, ios_threshold)
        counts["fused"] += n_fused
        counts["suppressed"] += len(fused) - len(kept)
        for it in kept:
            rle = {"size": list(it["rle"]["size"]), "counts": it["rle"]["counts"].decode("ascii")}
            results.append({"image_id": scene_id, "category_id": it["category_id"], "score": it["score"],
                            "bbox": it["bbox"], "area": it["area"], "segmentation": rle})
    counts["out"] = len(results)
    if stats is not None:
        stats.update(counts)
    return results, sorted(scenes.values(), key=lambda s: s["id"])
