"""YOLO-seg labels (normalised polygons per line) plus ``data.yaml`` class names to COCO.

A label line is ``class x1 y1 x2 y2 ...`` with coordinates in [0, 1]. Box-only lines
(``class cx cy w h``) become rectangles and are counted. Coordinates slightly outside [0, 1]
are clipped; non-finite ones, ones more than an image size outside (below -1 or above 2) and
degenerate polygons (fewer than 3 distinct points or no area after clipping) are dropped and
counted, so the output passes ``rsiseg data validate``.

Class ids: label index ``k`` is category id ``k + 1``, also when ``names`` is an ``{index: name}``
mapping with gaps (``{0: car, 2: plane}`` gives ids 1 and 3). Some exporters sort numeric class
names as strings (``['0', '1', '10', '2', ...]``); the index in a label file then points into that
sorted list, so when ``names`` is a list of numbers the class is resolved by its name and the
COCO categories are ordered by numeric value.

Layout read: ``SRC/data.yaml`` (or the file given as ``ann``) with ``train``/``val``/``test``
image folders (a folder, a list of folders, or a .txt list of images; relative to its ``path`` or
to ``SRC``) and labels in the parallel ``labels`` folders. A split whose folder is absent is
reported and the others converted. Written: ``OUT/annotations/instances_{split}.json`` with
``file_name`` relative to the images root (``images_root`` in the summary).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from rsiseg.data.coco_index import FAR_OUTSIDE_FACTOR, DataError
from rsiseg.data.converters.common import SourceReport, require_images, require_source_dir, write_outputs
from rsiseg.data.validate import polygon_problem

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def read_spec(data_yaml: Path) -> dict[str, Any]:
    """The parsed ``data.yaml``; unreadable files and non-mappings raise :class:`DataError`."""
    if not data_yaml.is_file():
        raise DataError(f"{data_yaml}: YOLO data.yaml not found")
    try:
        spec = yaml.safe_load(data_yaml.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DataError(f"{data_yaml}: cannot read YOLO data.yaml ({err})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{data_yaml}: expected a mapping with 'names' and split folders")
    return spec


def read_class_names(data_yaml: Path, spec: dict[str, Any] | None = None) -> dict[int, str]:
    """``{label index: name}`` from a ``names`` list or an ``{index: name}`` mapping (gaps kept)."""
    names = (spec if spec is not None else read_spec(data_yaml)).get("names")
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise DataError(f"{data_yaml}: field 'names' is missing or empty")
    try:
        out = {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{data_yaml}: field 'names' has a key that is not a class index: {list(names)}") from None
    if min(out) < 0:
        raise DataError(f"{data_yaml}: field 'names' has a negative class index {min(out)}")
    return out


def categories_for(names: dict[int, str] | list[str]) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """COCO categories and ``{label index: category id}``.

    A list (or gap-free ``0..K-1`` mapping) of numeric names is mapped by name, ordered by value;
    otherwise label ``k`` is category ``k + 1``.
    """
    names = dict(enumerate(names)) if isinstance(names, list) else names
    values = [names[k] for k in sorted(names)]
    if sorted(names) == list(range(len(names))) and all(n.strip().lstrip("-").isdigit() for n in values):
        ordered = sorted(values, key=int)
        categories = [{"id": i, "name": n} for i, n in enumerate(ordered, start=1)]
        by_name = {c["name"]: c["id"] for c in categories}
        return categories, {k: by_name[n] for k, n in names.items()}
    return [{"id": k + 1, "name": names[k]} for k in sorted(names)], {k: k + 1 for k in names}


def parse_label_line(line: str, width: int, height: int) -> tuple[int, list[float], str | None]:
    """``(class index, polygon in pixels, note)``; note is ``"box-only"`` or a reason to skip."""
    values = line.split()
    try:
        cls, coords = int(values[0]), [float(v) for v in values[1:]]
    except (ValueError, IndexError):
        return -1, [], "unparsable line"
    if not all(math.isfinite(v) for v in coords):
        return cls, [], "non-finite coordinate"
    if not all(1 - FAR_OUTSIDE_FACTOR <= v <= FAR_OUTSIDE_FACTOR for v in coords):
        return cls, [], "coordinate far outside the image"
    if len(coords) == 4:
        cx, cy, w, h = coords
        coords = [cx - w / 2, cy - h / 2, cx + w / 2, cy - h / 2, cx + w / 2, cy + h / 2, cx - w / 2, cy + h / 2]
        note = "box-only"
    elif len(coords) < 6 or len(coords) % 2:
        return cls, [], "polygon with < 3 points or odd coordinates"
    else:
        note = None
    polygon = [round(min(max(v, 0.0), 1.0) * (width if i % 2 == 0 else height), 2) for i, v in enumerate(coords)]
    if len(set(zip(polygon[0::2], polygon[1::2]))) < 3:
        return cls, [], "polygon with < 3 distinct points"
    problem = polygon_problem(polygon)
    if problem is not None and problem[0] != "self-intersecting polygon":  # that one is a warning only
        return cls, [], f"{problem[0]} after clipping to the image"
    return cls, polygon, note


def convert_split(root: Path, image_paths: list[Path], label_to_cat: dict[int, int], report: SourceReport,
                  first_ann_id: int) -> dict[str, Any]:
    """One split's images to a COCO dict without categories; every dropped line is counted in ``report``."""
    images, annotations = [], []
    for image_id, path in enumerate(image_paths, start=1):
        try:
            with Image.open(path) as img:
                width, height = img.size
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot be read as an image ({err})") from None
        images.append({"id": image_id, "file_name": _relative(path, root), "width": width, "height": height})
        label = _label_path(path)
        if not label.is_file():
            report.add("image without label file (kept, no instances)", str(path))
            continue
        try:
            lines = label.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{label}: cannot be read as a YOLO label file ({err})") from None
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            cls, polygon, note = parse_label_line(line, width, height)
            where = f"{label}:{lineno}"
            if note == "unparsable line" or cls not in label_to_cat:
                report.add("unparsable line (skipped)" if cls < 0 else "unknown class index (skipped)",
                           f"{where}: {line.strip()[:40]}")
                continue
            if not polygon:
                report.add(f"{note} (skipped)", where)
                continue
            if note:
                report.add("box-only label (kept as rectangle)", where)
            xs, ys = polygon[0::2], polygon[1::2]
            annotations.append({"id": first_ann_id + len(annotations), "image_id": image_id,
                                "category_id": label_to_cat[cls], "segmentation": [polygon],
                                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                                "area": _polygon_area(xs, ys), "iscrowd": 0})
    return {"images": images, "annotations": annotations}


def convert_yolo(src: str | Path, out: str | Path, *, split: str | None = None,
                 ann: str | Path | None = None) -> dict[str, Any]:
    """Convert every split that ``data.yaml`` names and that exists (or only ``split``).

    Returns:
        ``{"splits": {split: {"images", "instances"}}, "missing_splits": {split: folder},
        "problems": {reason: count}, "problem_examples": ..., "images_root": str}``.

    Raises:
        DataError: no data.yaml, bad ``names``, no split folder present, ``split`` absent, no
            image at all, or an unreadable image; nothing is written then.
    """
    src, out = Path(src), Path(out)
    data_yaml = Path(ann) if ann else require_source_dir(src, "a YOLO dataset: data.yaml, images/, labels/") / "data.yaml"
    spec = read_spec(data_yaml)
    categories, label_to_cat = categories_for(read_class_names(data_yaml, spec))
    root = _images_root(data_yaml, spec)
    found, missing = _find_splits(root, spec, data_yaml, split)
    report, outputs, summary = SourceReport(), {}, {}
    next_id = 1
    for name, paths in found.items():
        coco = convert_split(root, paths, label_to_cat, report, next_id) | {"categories": categories}
        next_id += len(coco["annotations"])
        outputs[f"annotations/instances_{name}.json"] = coco
        summary[name] = {"images": len(coco["images"]), "instances": len(coco["annotations"])}
    require_images(sum(s["images"] for s in summary.values()), root,
                   f"the split folders {', '.join(str(spec[n]) for n in found)} hold no image")
    write_outputs(out, outputs)
    return {"splits": summary, "missing_splits": missing, "problems": dict(report.skipped),
            "problem_examples": report.examples, "images_root": str(root)}


def _images_root(data_yaml: Path, spec: dict[str, Any]) -> Path:
    """The folder split entries (and so ``file_name``) are relative to: ``path`` of data.yaml, else its folder."""
    base = data_yaml.parent
    if spec.get("path") and not isinstance(spec["path"], str):
        raise DataError(f"{data_yaml}: field 'path' must be a folder name, got {spec['path']!r}")
    root = Path(spec["path"]) if spec.get("path") else base
    root = root if root.is_absolute() else base / root
    return root if root.is_dir() else base


def _find_splits(root: Path, spec: dict[str, Any], data_yaml: Path,
                 split: str | None) -> tuple[dict[str, list[Path]], dict[str, Any]]:
    """``({split: image paths}, {split: absent folder(s)})`` for the splits data.yaml names (or ``split``)."""
    named = [s for s in SPLITS if spec.get(s)]
    if split and split not in named:
        raise DataError(f"{data_yaml}: --split {split!r} is not named there (it names {named})")
    found, missing = {}, {}
    for name in [split] if split else named:
        paths, absent = _split_images(root, spec[name], data_yaml, name)
        entries = len(spec[name]) if isinstance(spec[name], list) else 1
        if not absent:
            found[name] = paths
        elif len(absent) == entries:  # the whole split is absent: convert the others and say so
            missing[name] = absent[0] if entries == 1 else absent
        else:
            raise DataError(f"{data_yaml}: field {name!r} names folders that do not exist: {absent}")
    if split and missing:
        raise DataError(f"{data_yaml}: field {split!r} names {missing[split]}, which does not exist")
    if not found:
        raise DataError(f"{data_yaml}: none of the split folders it names exists: {missing}")
    return found, missing


def _split_images(root: Path, entry: Any, data_yaml: Path, split: str) -> tuple[list[Path], list[str]]:
    """Sorted image paths of one split entry (folder, list of folders, or .txt list), and what is absent."""
    entries = entry if isinstance(entry, list) else [entry]
    paths: list[Path] = []
    absent: list[str] = []
    for item in entries:
        if not isinstance(item, str):
            raise DataError(f"{data_yaml}: field {split!r} must be a folder, a list of folders or a .txt file")
        where = Path(item) if Path(item).is_absolute() else root / item
        if where.is_dir():
            paths += [p for p in where.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        elif where.is_file() and where.suffix == ".txt":
            try:
                listed = [line.strip() for line in where.read_text().splitlines() if line.strip()]
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: image list (field {split!r} of {data_yaml}) is not UTF-8 text: {err}") from None
            paths += [Path(p) if Path(p).is_absolute() else root / p for p in listed]
        else:
            absent.append(str(where))
    return sorted(set(paths)), absent


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # an image listed outside the root keeps its full path
        return path.as_posix()


def _label_path(image: Path) -> Path:
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
