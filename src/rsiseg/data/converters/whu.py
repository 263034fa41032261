"""WHU building dataset (aerial tiles with binary building masks) to COCO instance annotations.

Layout read: ``SRC/{train,val,test}/image/*.tif|png`` and, with the same names,
``SRC/{split}/label/*`` holding binary masks (255 or 1 is building, 0 is background).
Written: ``OUT/annotations/instances_{split}.json`` with one category, ``building``.
Every 8-connected component of a mask is one instance; its segmentation is a compressed
RLE, so holes (courtyards) are exact. ``file_name`` is relative to ``SRC``; images are not copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from rsiseg.data.coco_index import DataError
from rsiseg.data.converters.common import require_images, require_source_dir, write_outputs
from rsiseg.structures import mask_to_rle

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".tif", ".tiff", ".png"}
CATEGORIES = [{"id": 1, "name": "building", "supercategory": "building"}]
WHAT = "WHU building splits as {train,val,test}/image and {train,val,test}/label"


def read_raster(path: Path) -> np.ndarray:
    """Read an image or mask unchanged (``[H, W]`` or ``[H, W, C]``); unreadable files raise :class:`DataError`."""
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise DataError(f"{path}: cannot be read as an image")
    return data


def find_label(label_dir: Path, image: Path) -> Path | None:
    """The label with the image's name, else one with the same stem and an image suffix."""
    same = label_dir / image.name
    if same.is_file():
        return same
    for suffix in sorted(IMAGE_SUFFIXES):
        other = label_dir / (image.stem + suffix)
        if other.is_file():
            return other
    return None


def mask_instances(mask: np.ndarray, min_area: int = 10) -> tuple[list[dict[str, Any]], int]:
    """Instances of a binary mask: 8-connected components as ``{segmentation, bbox, area}``.

    Returns:
        ``(instances, dropped)`` where ``dropped`` counts components smaller than ``min_area`` pixels.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    instances, dropped = [], 0
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area:
            dropped += 1
            continue
        component = np.zeros(mask.shape, dtype=np.uint8)
        component[y:y + h, x:x + w] = labels[y:y + h, x:x + w] == i
        instances.append({"segmentation": mask_to_rle(component), "bbox": [float(x), float(y), float(w), float(h)],
                          "area": float(area)})
    return instances, dropped


def convert_split(src: Path, split: str, min_area: int) -> tuple[dict[str, Any], dict[str, int]]:
    """The COCO dict of one split and its counts."""
    image_dir, label_dir = src / split / "image", src / split / "label"
    images, annotations = [], []
    counts = {"images": 0, "instances": 0, "dropped_small": 0, "missing_labels": 0}
    paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for image_id, path in enumerate(paths, start=1):
        height, width = read_raster(path).shape[:2]
        images.append({"id": image_id, "file_name": path.relative_to(src).as_posix(), "height": height, "width": width})
        label_path = find_label(label_dir, path)
        if label_path is None:
            counts["missing_labels"] += 1
            continue
        label = read_raster(label_path)
        if label.shape[:2] != (height, width):
            raise DataError(f"{label_path}: label size {label.shape[1]}x{label.shape[0]} differs from its image "
                             f"{path.name} ({width}x{height})")
        if label.ndim == 3:
            label = label.max(axis=-1)
        instances, dropped = mask_instances(label, min_area)
        counts["dropped_small"] += dropped
        for inst in instances:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                **inst})
    counts["images"], counts["instances"] = len(images), len(annotations)
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}, counts


def convert_whu(src: str | Path, out: str | Path, min_area: int = 10) -> dict[str, Any]:
    """Write ``OUT/annotations/instances_{split}.json`` for every split folder of a WHU building release.

    Returns:
        ``{split: {"images", "instances", "dropped_small", "missing_labels"}}`` for every split written.

    Raises:
        DataError: no ``{split}/image`` folder under ``src``, or an unreadable file.
        DataError: also for a label whose size differs from its image (the message names the label),
            and when no split holds an image. Nothing is written then.
    """
    src, out = Path(src), Path(out)
    require_source_dir(src, WHAT)
    splits = [s for s in SPLITS if (src / s / "image").is_dir()]
    if not splits:
        raise DataError(f"{src}: no WHU split found (looked for {{train,val,test}}/image)")
    converted = {split: convert_split(src, split, min_area) for split in splits}
    require_images(sum(counts["images"] for _, counts in converted.values()), src,
                   f"the {'/'.join(f'{s}/image' for s in splits)} folders hold no {'/'.join(sorted(IMAGE_SUFFIXES))}")
    empty = [f"{s}/image" for s, (_, counts) in converted.items() if counts["images"] == 0]
    write_outputs(out, {f"annotations/instances_{s}.json": coco for s, (coco, counts) in converted.items()
                        if counts["images"]})
    summary: dict[str, Any] = {s: counts for s, (_, counts) in converted.items() if counts["images"]}
    return summary | ({"empty_splits": empty} if empty else {})
