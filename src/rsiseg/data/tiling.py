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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rsiseg.data.coco_index import DataError, DataReport
from rsiseg.data.filters import draw_kept_share
from rsiseg.data.io import TIFF_SUFFIXES, image_size, is_band_first
from rsiseg.masks import InstanceMasks

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
class _Patch:
    scene: dict[str, Any]
    window: Window
    anns: list[dict[str, Any]] = field(default_factory=list)


def _clip(ann: dict[str, Any], masks: InstanceMasks, i: int, window: Window, full_area: int,
          min_visible: float, report: DataReport) -> dict[str, Any] | None:
    """Scene annotation ``ann`` as seen in ``window``: instance ``i`` of ``masks`` (cropped to it).

    ``id`` and ``image_id`` are not yet set; None when nothing (or too little) is visible.
    """
    area = int(masks.areas()[i])
    if area == 0:
        return None
    if area / full_area < min_visible:
        report.add("clipped fragment below min_visible", f"ann {ann['id']} in {window}: {area}/{full_area} px")
        return None
    x1, y1, x2, y2 = masks.boxes()[i].tolist()
    # Crowd regions stay RLE; polygons are clipped as geometry (RLE where the clip has holes).
    segm = masks.to_rle(i) if ann.get("iscrowd", 0) else masks.to_coco(i)
    out = {k: v for k, v in ann.items() if k not in ("id", "image_id", "segmentation", "bbox", "area")}
    out.update(segmentation=segm, bbox=[x1, y1, x2 - x1, y2 - y1], area=float(area), scene_ann_id=ann["id"])
    return out


def _plan_scene(
    scene: dict[str, Any], anns: list[dict[str, Any]], size: int, overlap: int,
    min_visible: float, report: DataReport,
) -> list[_Patch]:
    """Clip every annotation of one scene into its windows, without any scene-size raster."""
    height, width = int(scene["height"]), int(scene["width"])
    decoded = []
    for ann in anns:
        try:
            masks = InstanceMasks.from_coco([ann["segmentation"]], height, width)
            empty = int(masks.areas()[0]) == 0
        except Exception as err:  # pycocotools raises many types for malformed input
            report.add("undecodable segmentation", f"ann {ann.get('id')}: {type(err).__name__}: {err}")
            continue
        if empty:
            report.add("empty instance", f"ann {ann.get('id')} in {scene['file_name']}")
            continue
        decoded.append((ann, masks.instances[0]))
    masks = InstanceMasks([inst for _, inst in decoded], height, width)
    boxes, areas = masks.boxes(), masks.areas()
    patches = []
    for window in patch_windows(height, width, size, overlap):
        patch = _Patch(scene, window)
        y1, y2, x1, x2 = window
        inside = torch.nonzero((boxes[:, 0] < x2) & (boxes[:, 2] > x1) & (boxes[:, 1] < y2) & (boxes[:, 3] > y1))[:, 0]
        cropped = masks[inside].crop((x1, y1, x2, y2))
        for k, i in enumerate(inside.tolist()):
            clipped = _clip(decoded[i][0], cropped, k, window, int(areas[i]), min_visible, report)
            if clipped is not None:
                patch.anns.append(clipped)
        patches.append(patch)
    return patches


def _patch_name(file_name: str, window: Window, stems: dict[str, str] | None = None) -> str:
    y1, y2, x1, x2 = window
    path = Path(file_name)
    stem = (stems or {}).get(file_name, path.stem)
    return f"{stem}_{y1}_{y2}_{x1}_{x2}{path.suffix}"


def patch_stems(file_names: list[str]) -> dict[str, str]:
    """The stem each scene's patches are named by, so that scenes never overwrite each other.

    ``images/`` is flat, so ``a/x.png`` and ``b/x.png`` would both give ``x_0_800_0_800.png``: scenes
    whose file name is shared take their folder path too (``a__x``, ``b__x``); the others keep their
    stem, so iSAID names stay ``Pxxxx_y1_y2_x1_x2``.

    Raises:
        DataError: a file_name listed twice, or names that still collide.
    """
    repeated = sorted(n for n, k in Counter(file_names).items() if k > 1)
    if repeated:
        raise DataError(f"file_name listed by more than one image: {repeated[:3]}; their patches would overwrite "
                        "each other (run `rsiseg data validate`)")
    shared = Counter(Path(n).name for n in file_names)
    stems = {n: Path(n).stem if shared[Path(n).name] == 1 else "__".join(Path(n).with_suffix("").parts)
             for n in file_names}
    clash = Counter((stem, Path(n).suffix) for n, stem in stems.items())
    if any(k > 1 for k in clash.values()):
        raise DataError(f"scene names collide even with their folders: {[s for s, k in clash.items() if k > 1][:3]}")
    return stems


def _write_scene_patches(src: Path, patches: list[_Patch], out_images: Path, stems: dict[str, str]) -> None:
    """Read a scene once and write its kept patches in the source format and dtype."""
    if src.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        array = tifffile.imread(src)
        band_first = is_band_first(array.shape)
        for p in patches:
            y1, y2, x1, x2 = p.window
            crop = array[:, y1:y2, x1:x2] if band_first else array[y1:y2, x1:x2]
            tifffile.imwrite(out_images / _patch_name(p.scene["file_name"], p.window, stems),
                             np.ascontiguousarray(crop))
        return
    from PIL import Image

    # PIL crops keep the mode (8-bit, 16-bit "I;16", palette) and re-save in the same format.
    with Image.open(src) as img:
        img.load()
        for p in patches:
            y1, y2, x1, x2 = p.window
            img.crop((x1, y1, x2, y2)).save(out_images / _patch_name(p.scene["file_name"], p.window, stems),
                                            format=img.format)


def split_coco(
    ann_file: str | Path, images_dir: str | Path, out_dir: str | Path, size: int = 800, overlap: int = 200,
    min_visible: float = 0.0, max_instances_per_image: int | None = None,
    max_empty_fraction: float | None = None, seed: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """Cut every scene of a COCO dataset into patches and clip its annotations to them.

    Writes ``out_dir/images/{stem}_{y1}_{y2}_{x1}_{x2}{suffix}`` (see :func:`patch_stems` for scenes
    that share a file name in different folders) and
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
    stems = patch_stems([scene["file_name"] for scene in data["images"]])

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
                    report.add("patch over max_instances", f"{_patch_name(scene['file_name'], p.window, stems)}: {len(p.anns)}")
            patches = [p for p in patches if len(p.anns) <= max_instances_per_image]
        plans.append(patches)

    if max_empty_fraction is not None:
        empty = [(i, j) for i, ps in enumerate(plans) for j, p in enumerate(ps) if not p.anns]
        keep = set(draw_kept_share(empty, max_empty_fraction, seed))
        for i, j in empty:
            if (i, j) not in keep:
                report.add("empty patch dropped", _patch_name(plans[i][j].scene["file_name"], plans[i][j].window, stems))
        plans = [[p for j, p in enumerate(ps) if p.anns or (i, j) in keep] for i, ps in enumerate(plans)]

    out_images = out_dir / "images"
    out_images.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for patches in tqdm(plans, desc="write", disable=not progress):
        if not patches:
            continue
        scene = patches[0].scene
        _write_scene_patches(images_dir / scene["file_name"], patches, out_images, stems)
        for p in patches:
            y1, y2, x1, x2 = p.window
            image_id = len(images) + 1
            images.append({
                "id": image_id, "file_name": _patch_name(scene["file_name"], p.window, stems),
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
