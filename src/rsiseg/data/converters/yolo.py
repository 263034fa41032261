"""YOLO-seg labels (normalised polygons per line) plus ``data.yaml`` class names to COCO.

A label line is ``class x1 y1 x2 y2 ...`` with coordinates in [0, 1]. Box-only lines
(``class cx cy w h``) become rectangles and are counted. Some exporters sort numeric class
names as strings (``['0', '1', '10', '2', ...]``); the index in a label file then points into
that sorted list, so when every name is a number the class is resolved by its name and the
COCO categories are ordered by numeric value.

Layout read: ``SRC/data.yaml`` with ``train``/``val``/``test`` image folders (relative to its
``path`` or to ``SRC``) and labels in the parallel ``labels`` folders. Written:
``OUT/annotations/instances_{split}.json`` with ``file_name`` relative to ``SRC``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from rsiseg.data.coco_index import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def read_class_names(data_yaml: Path) -> list[str]:
    """Class names in label-index order, from a list or an ``{index: name}`` mapping."""
    try:
        spec = yaml.safe_load(data_yaml.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"{data_yaml}: cannot read YOLO data.yaml ({err})") from None
    names = spec.get("names") if isinstance(spec, dict) else None
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, list) or not names:
        raise DataError(f"{data_yaml}: field 'names' is missing or empty")
    return [str(n) for n in names]


def categories_for(names: list[str]) -> tuple[list[dict[str, Any]], list[int]]:
    """COCO categories and the category id of each label index.

    Numeric names are mapped by name (ordered by value), others by position.
    """
    if all(n.strip().lstrip("-").isdigit() for n in names):
        ordered = sorted(names, key=int)
    else:
        ordered = list(names)
    categories = [{"id": i, "name": n} for i, n in enumerate(ordered, start=1)]
    by_name = {c["name"]: c["id"] for c in categories}
    return categories, [by_name[n] for n in names]


def parse_label_line(line: str, width: int, height: int) -> tuple[int, list[float], str | None]:
    """``(class index, polygon in pixels, note)``; note is ``"box-only"`` or a reason to skip."""
    values = line.split()
    try:
        cls, coords = int(values[0]), [float(v) for v in values[1:]]
    except (ValueError, IndexError):
        return -1, [], "unparsable line"
    if len(coords) == 4:
        cx, cy, w, h = coords
        coords = [cx - w / 2, cy - h / 2, cx + w / 2, cy - h / 2, cx + w / 2, cy + h / 2, cx - w / 2, cy + h / 2]
        note = "box-only"
    elif len(coords) < 6 or len(coords) % 2:
        return cls, [], "polygon with < 3 points or odd coordinates"
    else:
        note = None
    polygon = [min(max(v, 0.0), 1.0) * (width if i % 2 == 0 else height) for i, v in enumerate(coords)]
    return cls, [round(v, 2) for v in polygon], note


def convert_split(root: Path, images_dir: Path, names: list[str], counts: Counter, first_ann_id: int) -> dict[str, Any]:
    """One split folder to a COCO dict; problems are counted in ``counts``."""
    categories, label_to_cat = categories_for(names)
    images, annotations = [], []
    paths = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for image_id, path in enumerate(paths, start=1):
        with Image.open(path) as img:
            width, height = img.size
        images.append({"id": image_id, "file_name": str(path.relative_to(root)), "width": width, "height": height})
        label = _label_path(images_dir, path)
        if not label.is_file():
            counts["image without label file (kept, no instances)"] += 1
            continue
        for line in label.read_text().splitlines():
            if not line.strip():
                continue
            cls, polygon, note = parse_label_line(line, width, height)
            if not 0 <= cls < len(names):
                counts[f"unknown class index (skipped) in {label.name}" if cls >= 0 else "unparsable line (skipped)"] += 1
                continue
            if not polygon:
                counts[f"{note} (skipped)"] += 1
                continue
            if note:
                counts["box-only label (kept as rectangle)"] += 1
            xs, ys = polygon[0::2], polygon[1::2]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            if box[2] <= 0 or box[3] <= 0:
                counts["zero-area polygon (skipped)"] += 1
                continue
            annotations.append({"id": first_ann_id + len(annotations), "image_id": image_id,
                                "category_id": label_to_cat[cls], "segmentation": [polygon], "bbox": box,
                                "area": _polygon_area(xs, ys), "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": categories}


def convert_yolo(src: str | Path, out: str | Path) -> dict[str, Any]:
    """Convert every split that ``SRC/data.yaml`` names; returns per-split counts and the problems counted."""
    src, out = Path(src), Path(out)
    data_yaml = src / "data.yaml"
    names = read_class_names(data_yaml)
    spec = yaml.safe_load(data_yaml.read_text())
    root = (src / spec["path"]) if spec.get("path") and not Path(spec["path"]).is_absolute() else Path(spec.get("path") or src)
    root = root if root.is_dir() else src
    summary: dict[str, Any] = {"splits": {}, "problems": {}}
    counts: Counter = Counter()
    next_id = 1
    for split in ("train", "val", "test"):
        if not spec.get(split):
            continue
        images_dir = root / spec[split]
        if not images_dir.is_dir():
            raise DataError(f"{data_yaml}: field {split!r} points to {images_dir}, which is not a folder")
        coco = convert_split(root, images_dir, names, counts, next_id)
        next_id += len(coco["annotations"])
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        summary["splits"][split] = {"images": len(coco["images"]), "instances": len(coco["annotations"])}
    summary["problems"] = dict(counts)
    summary["images_root"] = str(root)
    return summary


def _label_path(images_dir: Path, image: Path) -> Path:
    """``.../images/<split>/a.jpg`` -> ``.../labels/<split>/a.txt`` (the YOLO convention)."""
    parts = list(image.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _polygon_area(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2.0
