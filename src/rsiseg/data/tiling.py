"""Cut large scenes and their COCO annotations into overlapping patches (the iSAID devkit recipe).

Scenes such as iSAID's (up to ~13k px a side) do not fit a detector's input, so training uses
``size x size`` patches with ``overlap`` pixels shared between neighbours. Each instance is
clipped at the patch borders; every patch and instance records where it came from
(``scene_id``, ``offset``, ``scene_ann_id``) so that predictions can be merged back later.

Two passes: the first clips annotations for every window (no pixels read), so that the
random choice of empty patches to keep is global and deterministic; the second reads each
scene once and writes the kept patches.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry import GeometryCollection, MultiPolygon, Polygon, box
from shapely.ops import unary_union
from shapely.validation import make_valid
from tqdm import tqdm

from rsiseg.data.coco_index import DataReport
from rsiseg.data.io import TIFF_SUFFIXES, image_size, is_band_first
from rsiseg.structures import mask_to_rle, segmentation_to_mask

logger = logging.getLogger(__name__)

Window = tuple[int, int, int, int]  # (y1, y2, x1, x2), end-exclusive


def _starts(length: int, size: int, stride: int) -> list[int]:
    """Start offsets along one axis; the last one is pulled back to end flush with the border."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride))
    starts.append(length - size)  # flush with the border instead of padding past it
    return starts


def patch_windows(height: int, width: int, size: int = 800, overlap: int = 200) -> list[Window]:
    """Patch windows covering an ``height x width`` image, row-major.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        size: patch side; a dimension no larger than it gets one window spanning it whole.
        overlap: pixels shared by neighbouring patches (stride = ``size - overlap``).

    Returns:
        ``(y1, y2, x1, x2)`` windows, end-exclusive, each at most ``size`` on a side.
    """
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError(f"need size > 0 and 0 <= overlap < size, got size={size}, overlap={overlap}")
    stride = size - overlap
    return [
        (y, min(y + size, height), x, min(x + size, width))
        for y in _starts(height, size, stride)
        for x in _starts(width, size, stride)
    ]


@dataclass
class _Instance:
    """One scene annotation rasterised inside its tight pixel box ``[y0:y0+h, x0:x0+w]``."""

    ann: dict[str, Any]
    mask: np.ndarray  # uint8[h, w]
    x0: int
    y0: int
    area: int
    geometry: Any = None  # shapely geometry when the source is polygons


@dataclass
class _Patch:
    scene: dict[str, Any]
    window: Window
    anns: list[dict[str, Any]] = field(default_factory=list)


def _rasterise(ann: dict[str, Any], height: int, width: int) -> _Instance | None:
    """Rasterise an annotation in its own box; polygons are rasterised locally to save memory."""
    segm = ann["segmentation"]
    geometry = None
    if isinstance(segm, list):
        coords = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in segm if len(p) >= 6]
        if not coords:
            return None
        pts = np.concatenate(coords)
        # Integer shift keeps pycocotools' rasterisation identical to the full-scene one.
        x0 = max(int(math.floor(pts[:, 0].min())) - 1, 0)
        y0 = max(int(math.floor(pts[:, 1].min())) - 1, 0)
        x1 = min(int(math.ceil(pts[:, 0].max())) + 2, width)
        y1 = min(int(math.ceil(pts[:, 1].max())) + 2, height)
        if x1 <= x0 or y1 <= y0:
            return None
        shifted = [(c - (x0, y0)).ravel().tolist() for c in coords]
        local = segmentation_to_mask(shifted, y1 - y0, x1 - x0)
        geometry = unary_union([make_valid(Polygon(c)) for c in coords if len(c) >= 3])
    else:
        full = segmentation_to_mask(segm, height, width)
        x0 = y0 = 0
        local = full
    ys, xs = np.nonzero(local)
    if len(xs) == 0:
        return None
    crop = np.ascontiguousarray(local[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1])
    return _Instance(ann, crop, x0 + int(xs.min()), y0 + int(ys.min()), int(len(xs)), geometry)


def _clipped_polygons(geometry: Any, window: Window) -> list[list[float]] | None:
    """COCO polygons of ``geometry`` clipped to ``window``, in patch coordinates; None if not expressible."""
    y1, y2, x1, x2 = window
    clipped = geometry.intersection(box(x1, y1, x2, y2))
    if isinstance(clipped, Polygon):
        parts = [clipped]
    elif isinstance(clipped, (MultiPolygon, GeometryCollection)):
        parts = [g for g in clipped.geoms if isinstance(g, Polygon)]
    else:
        return None
    polygons = []
    for part in parts:
        if part.is_empty or part.area <= 0:
            continue
        if part.interiors:
            return None  # COCO polygons cannot encode holes; use RLE instead
        ring = np.asarray(part.exterior.coords)[:-1] - (x1, y1)
        if len(ring) >= 3:
            polygons.append([round(float(v), 2) for v in ring.ravel()])
    return polygons or None


def _clip(inst: _Instance, window: Window, min_visible: float, report: DataReport) -> dict[str, Any] | None:
    """The part of ``inst`` inside ``window`` as a patch annotation (``id`` not yet set), or None."""
    y1, y2, x1, x2 = window
    h, w = inst.mask.shape
    cy1, cy2 = max(y1, inst.y0), min(y2, inst.y0 + h)
    cx1, cx2 = max(x1, inst.x0), min(x2, inst.x0 + w)
    if cy2 <= cy1 or cx2 <= cx1:
        return None
    fragment = inst.mask[cy1 - inst.y0: cy2 - inst.y0, cx1 - inst.x0: cx2 - inst.x0]
    area = int(fragment.sum())
    if area == 0:
        return None
    if area / inst.area < min_visible:
        report.add("clipped fragment below min_visible", f"ann {inst.ann['id']} in {window}: {area}/{inst.area} px")
        return None
    ys, xs = np.nonzero(fragment)
    # bbox/area come from the clipped raster, in patch coordinates.
    bx, by = cx1 - x1 + int(xs.min()), cy1 - y1 + int(ys.min())
    bbox = [float(bx), float(by), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
    segm = None
    if inst.geometry is not None and not inst.ann.get("iscrowd", 0):
        segm = _clipped_polygons(inst.geometry, window)
    if segm is None:
        patch_mask = np.zeros((y2 - y1, x2 - x1), dtype=np.uint8)
        patch_mask[cy1 - y1: cy2 - y1, cx1 - x1: cx2 - x1] = fragment
        segm = mask_to_rle(patch_mask)
    out = {k: v for k, v in inst.ann.items() if k not in ("id", "image_id", "segmentation", "bbox", "area")}
    out.update(segmentation=segm, bbox=bbox, area=float(area), scene_ann_id=inst.ann["id"])
    return out


def _plan_scene(
    scene: dict[str, Any], anns: list[dict[str, Any]], size: int, overlap: int,
    min_visible: float, report: DataReport,
) -> list[_Patch]:
    """Clip every annotation of one scene into its windows."""
    height, width = int(scene["height"]), int(scene["width"])
    instances = []
    for ann in anns:
        try:
            inst = _rasterise(ann, height, width)
        except Exception as err:  # pycocotools/shapely raise many types for malformed input
            report.add("undecodable segmentation", f"ann {ann.get('id')}: {type(err).__name__}: {err}")
            continue
        if inst is None:
            report.add("empty instance", f"ann {ann.get('id')} in {scene['file_name']}")
            continue
        instances.append(inst)
    patches = []
    for window in patch_windows(height, width, size, overlap):
        patch = _Patch(scene, window)
        for inst in instances:
            clipped = _clip(inst, window, min_visible, report)
            if clipped is not None:
                patch.anns.append(clipped)
        patches.append(patch)
    return patches


def _patch_name(file_name: str, window: Window) -> str:
    y1, y2, x1, x2 = window
    path = Path(file_name)
    return f"{path.stem}_{y1}_{y2}_{x1}_{x2}{path.suffix}"


def _write_scene_patches(src: Path, patches: list[_Patch], out_images: Path) -> None:
    """Read a scene once and write its kept patches in the source format and dtype."""
    if src.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        array = tifffile.imread(src)
        band_first = is_band_first(array.shape)
        for p in patches:
            y1, y2, x1, x2 = p.window
            crop = array[:, y1:y2, x1:x2] if band_first else array[y1:y2, x1:x2]
            tifffile.imwrite(out_images / _patch_name(src.name, p.window), np.ascontiguousarray(crop))
        return
    from PIL import Image

    # PIL crops keep the mode (8-bit, 16-bit "I;16", palette) and re-save in the same format.
    with Image.open(src) as img:
        img.load()
        for p in patches:
            y1, y2, x1, x2 = p.window
            img.crop((x1, y1, x2, y2)).save(out_images / _patch_name(src.name, p.window), format=img.format)


def split_coco(
    ann_file: str | Path, images_dir: str | Path, out_dir: str | Path, size: int = 800, overlap: int = 200,
    min_visible: float = 0.0, max_instances_per_image: int | None = None,
    max_empty_fraction: float | None = None, seed: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """Cut every scene of a COCO dataset into patches and clip its annotations to them.

    Writes ``out_dir/images/{stem}_{y1}_{y2}_{x1}_{x2}{suffix}`` and
    ``out_dir/annotations/instances.json``. Patch image entries carry ``scene_file``,
    ``scene_id`` and ``offset = [x1, y1]``; annotations carry ``scene_ann_id``.

    Args:
        ann_file: COCO instances JSON of the scenes.
        images_dir: root that the scenes' ``file_name`` are relative to.
        out_dir: output folder.
        size: patch side in pixels.
        overlap: pixels shared by neighbouring patches.
        min_visible: clipped fragments keeping less than this fraction of the instance's pixels
            are dropped and counted.
        max_instances_per_image: patches with more instances are dropped and counted (iSAID: 400).
        max_empty_fraction: keep ``floor(fraction * n_empty)`` of the patches without instances,
            drawn with ``seed`` (iSAID: 0.3); None keeps all.
        seed: seed of that draw.
        progress: show tqdm bars.

    Returns:
        Summary: counts of scenes, patches and instances written, ``skipped`` counts by kind and
        the output annotation path.
    """
    ann_file, images_dir, out_dir = Path(ann_file), Path(images_dir), Path(out_dir)
    data = json.loads(ann_file.read_text())
    report = DataReport(str(ann_file))
    anns_by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in data.get("annotations", []):
        anns_by_image.setdefault(ann["image_id"], []).append(ann)

    plans: list[list[_Patch]] = []
    for scene in tqdm(data["images"], desc="clip", disable=not progress):
        src = images_dir / scene["file_name"]
        if not src.is_file():
            report.add("scene image missing", str(src))
            continue
        if image_size(src) != (int(scene["height"]), int(scene["width"])):
            report.add("scene size differs from JSON", str(src))
            continue
        patches = _plan_scene(scene, anns_by_image.get(scene["id"], []), size, overlap, min_visible, report)
        if max_instances_per_image is not None:
            for p in patches:
                if len(p.anns) > max_instances_per_image:
                    report.add("patch over max_instances", f"{_patch_name(scene['file_name'], p.window)}: {len(p.anns)}")
            patches = [p for p in patches if len(p.anns) <= max_instances_per_image]
        plans.append(patches)

    if max_empty_fraction is not None:
        empty = [(i, j) for i, ps in enumerate(plans) for j, p in enumerate(ps) if not p.anns]
        keep = set(random.Random(seed).sample(empty, int(math.floor(max_empty_fraction * len(empty)))))
        for i, j in empty:
            if (i, j) not in keep:
                report.add("empty patch dropped", _patch_name(plans[i][j].scene["file_name"], plans[i][j].window))
        plans = [[p for j, p in enumerate(ps) if p.anns or (i, j) in keep] for i, ps in enumerate(plans)]

    out_images = out_dir / "images"
    out_images.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for patches in tqdm(plans, desc="write", disable=not progress):
        if not patches:
            continue
        scene = patches[0].scene
        _write_scene_patches(images_dir / scene["file_name"], patches, out_images)
        for p in patches:
            y1, y2, x1, x2 = p.window
            image_id = len(images) + 1
            images.append({
                "id": image_id, "file_name": _patch_name(scene["file_name"], p.window),
                "height": y2 - y1, "width": x2 - x1,
                "scene_file": scene["file_name"], "scene_id": scene["id"], "offset": [x1, y1],
            })
            for ann in p.anns:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})

    ann_out = out_dir / "annotations" / "instances.json"
    ann_out.parent.mkdir(parents=True, exist_ok=True)
    ann_out.write_text(json.dumps({"images": images, "annotations": annotations,
                                   "categories": data.get("categories", [])}))
    if report.counts:
        logger.info(report.summary())
    return {
        "scenes": len(data["images"]), "patches": len(images), "instances": len(annotations),
        "skipped": dict(report.counts), "annotations": str(ann_out),
    }
