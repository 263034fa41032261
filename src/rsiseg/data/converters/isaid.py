"""Convert the iSAID release PNG format (also used by HRSID patches) to COCO instances.

Per scene the release holds ``Pxxxx.png`` (the image), ``Pxxxx_instance_id_RGB.png`` (each
instance one unique RGB colour, black is background) and ``Pxxxx_instance_color_RGB.png``
(each pixel the colour of its class). :func:`convert_isaid` writes
``out/annotations/instances.json``; it copies no image. ``file_name`` is the image path
relative to ``src``, so ``src`` is the images directory to pass to training.

Segmentations are COCO polygons in pixel-edge coordinates (each polygon outlines the
pixels, not their centres, so decoding reproduces the mask), or a compressed RLE when the
mask has a hole or its polygons would not decode back faithfully. Nothing is dropped
silently: every skipped instance, scene or contour is counted in the returned summary.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import shapely
from PIL import Image
from scipy import ndimage
from shapely.geometry import LineString, Point, Polygon
from tqdm import tqdm

from rsiseg.data.converters.common import require_images, require_source_dir, write_outputs
from rsiseg.structures import mask_to_rle, segmentation_to_mask

log = logging.getLogger(__name__)

RGB = tuple[int, int, int]

# Class name -> RGB of the iSAID devkit; category ids are 1..15 in this order.
ISAID_CLASSES: list[tuple[str, RGB]] = [
    ("ship", (0, 0, 63)),
    ("storage_tank", (0, 63, 63)),
    ("baseball_diamond", (0, 63, 0)),
    ("tennis_court", (0, 63, 127)),
    ("basketball_court", (0, 63, 191)),
    ("Ground_Track_Field", (0, 63, 255)),
    ("Bridge", (0, 127, 63)),
    ("Large_Vehicle", (0, 127, 127)),
    ("Small_Vehicle", (0, 0, 127)),
    ("Helicopter", (0, 0, 191)),
    ("Swimming_pool", (0, 0, 255)),
    ("Roundabout", (0, 191, 127)),
    ("Soccer_ball_field", (0, 127, 191)),
    ("plane", (0, 127, 255)),
    ("Harbor", (0, 100, 155)),
]
# The HRSID patches use the same PNG scheme but paint every ship (128, 0, 0), which is not
# an iSAID palette colour; pass ``classes=HRSID_CLASSES`` for them.
HRSID_CLASSES: list[tuple[str, RGB]] = [("ship", (128, 0, 0))]

ID_SUFFIX = "_instance_id_RGB.png"
CLASS_SUFFIX = "_instance_color_RGB.png"
NO_CLASS = "no class colour"
BELOW_MIN_AREA = "below min_area"
SHORT_CONTOUR = "contours < 3 points"
# Polygons whose decoding overlaps the mask less than this are replaced by an RLE.
MIN_POLYGON_IOU = 0.9


def _keys(rgb: np.ndarray) -> np.ndarray:
    """Pack ``[..., 3]`` uint8 RGB into one int32 per pixel, so colours compare as scalars."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _mask_polygons(mask: np.ndarray) -> tuple[list[list[float]], int]:
    """Pixel-edge polygons of the external contours of a hole-free mask.

    cv2 contours run through pixel centres, which loses half a pixel on every side (a
    10 x 10 square would decode to 9 x 9); growing each contour by half a pixel and shifting
    by +0.5 gives the COCO edge convention. Buffering the outline, not only the area, keeps
    one-pixel-wide parts that have no area as a polygon.

    Returns:
        The polygons as flat ``[x0, y0, x1, y1, ...]`` lists, and the number of output rings
        dropped for having fewer than 3 points.
    """
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons: list[list[float]] = []
    dropped = 0
    for contour in contours:
        pts = contour.reshape(-1, 2).astype(np.float64)
        if len(pts) == 1:
            outline = Point(pts[0])
        else:
            outline = LineString(np.vstack([pts, pts[:1]]))
        parts = [outline] + ([shapely.make_valid(Polygon(pts))] if len(pts) >= 3 else [])
        grown = shapely.unary_union(parts).buffer(0.5, cap_style="square", join_style="bevel")
        for geom in getattr(grown, "geoms", [grown]):
            ring = np.asarray(geom.exterior.coords)[:-1] + 0.5
            if len(ring) < 3:  # cannot happen after buffering; counted all the same
                dropped += 1
                continue
            polygons.append(ring.ravel().round(2).tolist())
    return polygons, dropped


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def _segment(crop: np.ndarray, x0: int, y0: int, height: int, width: int) -> tuple[Any, bool, int]:
    """COCO segmentation of one instance whose mask ``crop`` sits at ``(x0, y0)``.

    Returns:
        The segmentation (polygons or RLE), whether it is an RLE, and the dropped ring count.
    """
    padded = np.pad(crop, 1)  # a zero border so contours touching the crop edge close
    # RETR_CCOMP puts holes at the second level: any contour with a parent is a hole.
    _, hierarchy = cv2.findContours(padded, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    has_hole = hierarchy is not None and bool((hierarchy[0][:, 3] != -1).any())
    dropped = 0
    if not has_hole:
        polygons, dropped = _mask_polygons(padded)
        if polygons and _iou(segmentation_to_mask(polygons, *padded.shape), padded) >= MIN_POLYGON_IOU:
            shift = np.array([x0 - 1, y0 - 1])  # padded crop -> image coordinates
            return [(np.reshape(p, (-1, 2)) + shift).ravel().round(2).tolist() for p in polygons], False, dropped
    full = np.zeros((height, width), np.uint8)
    full[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
    return mask_to_rle(full), True, dropped


def instances_from_pngs(
    id_rgb: np.ndarray, color_rgb: np.ndarray, classes: Sequence[tuple[str, RGB]] = ISAID_CLASSES,
) -> list[dict[str, Any]]:
    """Split an instance-id PNG into instances and classify each by the class PNG.

    Each distinct non-black colour of ``id_rgb`` is one instance. Its class is the most
    frequent palette colour under its pixels in ``color_rgb``; non-palette pixels (black,
    anti-aliasing) do not vote, and ties go to the lower class id.

    Args:
        id_rgb: ``uint8[H, W, 3]`` instance-id image.
        color_rgb: ``uint8[H, W, 3]`` class-colour image of the same size.
        classes: ``(name, rgb)`` per class; category ids are 1..K in this order.

    Returns:
        One dict per instance, sorted by colour: ``colour`` (RGB), ``category_id`` (``None``
        when no pixel has a palette colour), ``mask`` (``uint8`` crop of the bbox, to keep
        memory small in scenes with thousands of instances), ``bbox`` (xywh ints),
        ``area`` (pixel count), ``segmentation`` (COCO polygons or RLE), ``is_rle`` and
        ``dropped_contours``.

    Raises:
        ValueError: the two images differ in size.
    """
    if id_rgb.shape[:2] != color_rgb.shape[:2]:
        raise ValueError(f"id image {id_rgb.shape[:2]} and class image {color_rgb.shape[:2]} differ in size")
    height, width = id_rgb.shape[:2]
    ids = _keys(id_rgb)
    colours, labels = np.unique(ids, return_inverse=True)
    labels = labels.reshape(ids.shape)
    # Class of every pixel of the class PNG: 0 for a colour outside the palette.
    palette = np.array([_keys(np.array(rgb, np.uint8)) for _, rgb in classes])
    order = np.argsort(palette)
    pix = _keys(color_rgb)
    pos = np.clip(np.searchsorted(palette[order], pix), 0, len(palette) - 1)
    pixel_class = np.where(palette[order][pos] == pix, order[pos] + 1, 0)

    instances = []
    for index, box in enumerate(ndimage.find_objects(labels + 1)):
        colour = int(colours[index])
        if colour == 0 or box is None:  # black is background
            continue
        crop = (labels[box] == index).astype(np.uint8)
        votes = np.bincount(pixel_class[box][crop > 0], minlength=len(classes) + 1)[1:]
        ys, xs = box
        segmentation, is_rle, dropped = _segment(crop, xs.start, ys.start, height, width)
        instances.append({
            "colour": (colour >> 16, (colour >> 8) & 255, colour & 255),
            "category_id": int(votes.argmax()) + 1 if votes.any() else None,
            "mask": crop,
            "bbox": [xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start],
            "area": int(crop.sum()),
            "segmentation": segmentation,
            "is_rle": is_rle,
            "dropped_contours": dropped,
        })
    return instances


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def convert_isaid(
    src: str | Path, out: str | Path, *, min_area: int = 1, progress: bool = True,
    classes: Sequence[tuple[str, RGB]] = ISAID_CLASSES,
) -> dict[str, Any]:
    """Convert every scene under ``src`` (searched recursively) to ``out/annotations/instances.json``.

    Image ids are 1..N in the order of the sorted relative image paths, so re-running gives
    the same ids. Scenes whose image or class PNG is missing are skipped and counted.

    Args:
        src: folder holding the scenes; also the image root for training.
        out: output folder.
        min_area: instances with fewer pixels are skipped and counted.
        progress: show a tqdm bar.
        classes: ``(name, rgb)`` per class, ids 1..K; :data:`HRSID_CLASSES` for HRSID.

    Returns:
        ``{"images", "instances", "rle_instances", "skipped": {reason: count},
        "per_class": {name: count}, "per_image": {file_name: count}}``. Reasons:
        ``"no class colour"`` and ``"below min_area"`` count instances,
        ``"scene: no image"`` and ``"scene: no class png"`` count scenes,
        ``"contours < 3 points"`` counts polygon rings.
    """
    src, out = Path(src), Path(out)
    require_source_dir(src, f"scenes as Pxxxx.png, Pxxxx{ID_SUFFIX} and Pxxxx{CLASS_SUFFIX}")
    skipped: Counter[str] = Counter()
    per_class: Counter[str] = Counter()
    images, annotations, per_image, rle_count = [], [], {}, 0
    scenes = sorted(src.rglob(f"*{ID_SUFFIX}"), key=lambda p: p.relative_to(src).as_posix())
    for id_path in tqdm(scenes, desc="iSAID scenes", disable=not progress):
        stem = id_path.name[: -len(ID_SUFFIX)]
        image_path, class_path = id_path.with_name(f"{stem}.png"), id_path.with_name(f"{stem}{CLASS_SUFFIX}")
        if not image_path.is_file() or not class_path.is_file():
            reason = "scene: no image" if not image_path.is_file() else "scene: no class png"
            log.warning("%s: skipped (%s)", id_path, reason)
            skipped[reason] += 1
            continue
        id_rgb = _read_rgb(id_path)
        image_id = len(images) + 1
        file_name = image_path.relative_to(src).as_posix()
        images.append({"id": image_id, "file_name": file_name, "height": id_rgb.shape[0], "width": id_rgb.shape[1]})
        kept = 0
        for inst in instances_from_pngs(id_rgb, _read_rgb(class_path), classes):
            skipped[SHORT_CONTOUR] += inst["dropped_contours"]
            if inst["category_id"] is None:
                log.warning("%s: instance colour %s has no class colour under it; skipped", stem, inst["colour"])
                skipped[NO_CLASS] += 1
                continue
            if inst["area"] < min_area:
                skipped[BELOW_MIN_AREA] += 1
                continue
            kept += 1
            rle_count += inst["is_rle"]
            per_class[classes[inst["category_id"] - 1][0]] += 1
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": inst["category_id"],
                "segmentation": inst["segmentation"], "area": float(inst["area"]),
                "bbox": [float(v) for v in inst["bbox"]], "iscrowd": 0,
            })
        per_image[file_name] = kept

    detail = f"{len(scenes)} *{ID_SUFFIX} files, skipped: {dict(skipped)}" if scenes else f"no *{ID_SUFFIX} file"
    require_images(len(images), src, detail)
    categories = [{"id": i, "name": name, "supercategory": name} for i, (name, _) in enumerate(classes, 1)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    write_outputs(out, {"annotations/instances.json": coco})
    return {
        "images": len(images), "instances": len(annotations), "rle_instances": rle_count,
        "skipped": {k: v for k, v in sorted(skipped.items()) if v}, "per_class": dict(sorted(per_class.items())),
        "per_image": per_image,
    }
