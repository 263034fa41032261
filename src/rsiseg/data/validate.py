"""Offline validation of a COCO instances dataset, and a repaired copy of it.

:func:`rsiseg.data.coco_index.load_coco_index` stops at the first problem (or silently counts
skips when repairing) because it guards training. This module is the tool a person runs before
that: it checks every image and annotation, collects *all* problems by kind with a severity and
the first examples, and can write a repaired copy (:func:`fix_coco`). Both share the per-annotation
checks below so that the report and the repairs never disagree.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shapely
from PIL import Image
from tqdm import tqdm

from rsiseg.data.coco_index import BOX_TOLERANCE_PX, FAR_OUTSIDE, NON_FINITE, DataError, number_problem, read_coco_json
from rsiseg.data.io import TIFF_SUFFIXES, image_size
from rsiseg.structures import rle_problem, rle_to_xywh, segmentation_to_rle

ERROR, WARNING = "error", "warning"
MAX_EXAMPLES = 5
MIN_BOX_MASK_IOU = 0.7  # below this the box and the mask most likely describe different objects

# Every kind a report can hold, with its severity. Warnings are things training copes with
# (pycocotools rasterises self-intersecting polygons; the box-mask mismatch only biases the box
# loss), errors are things that make load_coco_index fail or that silently lose data.
KINDS: dict[str, str] = {
    "no images": ERROR,
    "duplicate category id": ERROR,
    "malformed category entry": ERROR,
    "malformed image entry": ERROR,
    "duplicate image id": ERROR,
    "duplicate file_name": ERROR,
    "missing image file": ERROR,
    "unreadable image": ERROR,
    "image size mismatch": ERROR,
    "malformed annotation": ERROR,
    "duplicate annotation id": ERROR,
    "unknown image id": ERROR,
    "unknown category id": ERROR,
    NON_FINITE: ERROR,
    FAR_OUTSIDE: ERROR,
    "bad segmentation": ERROR,
    "bad iscrowd": ERROR,
    "malformed polygon": ERROR,
    "polygon with < 3 points": ERROR,
    "zero-area polygon": ERROR,
    "self-intersecting polygon": WARNING,
    "bad RLE": ERROR,
    "missing bbox": ERROR,
    "zero-area box": ERROR,
    "box outside image": ERROR,
    "box beyond image border": ERROR,
    "box inconsistent with mask": WARNING,
}
# Kinds --fix cannot repair: they need a person (which duplicate image is right? which size?).
UNFIXABLE = frozenset({"no images", "duplicate category id", "malformed category entry", "malformed image entry", "duplicate image id",
                       "duplicate file_name", "image size mismatch"})
_DROP_KINDS = frozenset({"unknown image id", "unknown category id", "bad segmentation", "bad RLE",
                         "zero-area box", "box outside image", NON_FINITE, FAR_OUTSIDE, "bad iscrowd"})
_POLYGON_KINDS = frozenset({"malformed polygon", "polygon with < 3 points", "zero-area polygon"})


@dataclass
class ValidationReport:
    """All problems of one dataset: counts per kind and the first examples of each.

    Attributes:
        source: the annotation file.
        num_images, num_annotations, num_categories: entries in the JSON.
        counts: kind -> number of occurrences (kinds are the keys of :data:`KINDS`).
        examples: kind -> up to :data:`MAX_EXAMPLES` strings naming the image file / annotation id.
        unusable_images: ids of images whose file is missing or cannot be read.
    """

    source: str
    num_images: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    unusable_images: set[int] = field(default_factory=set)

    def add(self, kind: str, example: str) -> None:
        """Count one problem of ``kind`` (must be a key of :data:`KINDS`)."""
        if kind not in KINDS:
            raise KeyError(f"unknown problem kind {kind!r}")
        self.counts[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(example)

    @property
    def errors(self) -> dict[str, int]:
        return {k: n for k, n in self.counts.items() if KINDS[k] == ERROR}

    @property
    def warnings(self) -> dict[str, int]:
        return {k: n for k, n in self.counts.items() if KINDS[k] == WARNING}

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings allowed)."""
        return not self.errors

    def summary(self) -> str:
        head = (f"{self.source}: {self.num_images} images, {self.num_annotations} annotations, "
                f"{self.num_categories} categories; {sum(self.errors.values())} errors, "
                f"{sum(self.warnings.values())} warnings")
        lines = [head]
        for kind, n in sorted(self.counts.items(), key=lambda kv: (KINDS[kv[0]] != ERROR, -kv[1])):
            lines.append(f"  {KINDS[kind]:7s} {n:6d}  {kind}")
            lines.extend(f"                  e.g. {ex}" for ex in self.examples[kind])
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``--report`` file)."""
        return {
            "source": self.source, "ok": self.ok, "num_images": self.num_images,
            "num_annotations": self.num_annotations, "num_categories": self.num_categories,
            "errors": sum(self.errors.values()), "warnings": sum(self.warnings.values()),
            "problems": {k: {"severity": KINDS[k], "count": n, "examples": self.examples[k]}
                         for k, n in sorted(self.counts.items())},
        }


def validate_coco(ann_file: str | Path, images_dir: str | Path, check_images: bool = True,
                  progress: bool = True) -> ValidationReport:
    """Check every image and annotation of a COCO instances JSON and collect all problems.

    Args:
        ann_file: COCO instances JSON.
        images_dir: folder the ``file_name`` entries are relative to.
        check_images: open every image file and compare its size to the JSON (the slow part).
        progress: show a progress bar over the images.

    Raises:
        DataError: when the file is not a COCO object at all (unreadable, no images/annotations/categories),
            or ``check_images`` and ``images_dir`` is not a folder.
    """
    raw = read_coco_json(Path(ann_file))
    if check_images and not Path(images_dir).is_dir():
        raise DataError(f"{images_dir}: image folder (--images) does not exist or is not a folder")
    report = ValidationReport(str(ann_file), len(raw["images"]), len(raw["annotations"]), len(raw["categories"]))
    if not raw["images"]:
        report.add("no images", f"{ann_file}: field 'images' is empty, so there is nothing to train or evaluate on")
    category_ids = _check_categories(raw["categories"], report)
    images = _check_image_entries(raw["images"], report)
    if check_images:
        for img in tqdm(images.values(), desc="images", disable=not progress, leave=False):
            kind, detail = _image_problem(Path(images_dir) / img["file_name"], img)
            if kind:
                report.add(kind, f"image id {img['id']} ({img['file_name']}): {detail}")
                if kind != "image size mismatch":
                    report.unusable_images.add(img["id"])
    seen: set[int] = set()
    for i, ann in enumerate(raw["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
            report.add("malformed annotation", f"annotations[{i}]: no integer 'id'")
            continue
        img = images.get(_int(ann.get("image_id")))
        where = f"annotation id {ann['id']} (image {img['file_name'] if img else repr(ann.get('image_id'))})"
        if ann["id"] in seen:
            report.add("duplicate annotation id", where)
        seen.add(ann["id"])
        for kind, detail in annotation_problems(ann, img, category_ids):
            report.add(kind, f"{where}: {detail}")
    return report


def annotation_problems(ann: dict[str, Any], img: dict[str, Any] | None,
                        category_ids: set[int]) -> list[tuple[str, str]]:
    """All ``(kind, detail)`` problems of one annotation; ``img`` is None for an unknown image id."""
    problems: list[tuple[str, str]] = []
    if _int(ann.get("category_id")) not in category_ids:
        problems.append(("unknown category id", f"category_id {ann.get('category_id')!r}"))
    if img is None:
        return problems + [("unknown image id", f"image_id {ann.get('image_id')!r}")]
    H, W = img["height"], img["width"]
    if (numbers := number_problem(ann, W, H)) is not None:
        return problems + [numbers]  # nothing below may rasterise a NaN or a coordinate at 1e12
    if ann.get("iscrowd", 0) not in (0, 1):
        problems.append(("bad iscrowd", f"field 'iscrowd' must be 0 or 1, got {ann.get('iscrowd')!r}"))
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        problems += [p for poly in segm if (p := polygon_problem(poly))]
    elif isinstance(segm, dict):
        if (rle := rle_problem(segm, H, W)) is not None:
            return problems + [("bad RLE", rle)]  # pycocotools must not see it
    elif segm is not None:
        problems.append(("bad segmentation", f"segmentation of type {type(segm).__name__}"))
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        return problems + [("missing bbox", f"bbox {bbox!r}")]
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return problems + [("zero-area box", f"box {bbox}")]
    tol = BOX_TOLERANCE_PX
    if x + w <= 0 or y + h <= 0 or x >= W or y >= H:
        return problems + [("box outside image", f"box {bbox} vs {W}x{H} image")]
    if x < -tol or y < -tol or x + w > W + tol or y + h > H + tol:
        problems.append(("box beyond image border", f"box {bbox} vs {W}x{H} image"))
    if not any(k in _DROP_KINDS or k in _POLYGON_KINDS for k, _ in problems):
        tight = mask_box(segm, H, W)
        # Tiny objects (SSDD ships of 5 px) reach IoU < 0.7 from integer rounding of the box alone,
        # so a mismatch also needs one edge off by more than the exporters' rounding tolerance.
        if tight is not None and (iou := box_iou(bbox, tight)) < MIN_BOX_MASK_IOU and _edge_gap(bbox, tight) > tol:
            problems.append(("box inconsistent with mask", f"box {bbox} vs mask box {tight} (IoU {iou:.2f})"))
    return problems


def polygon_problem(poly: Any) -> tuple[str, str] | None:
    """The problem of one COCO polygon ``[x0, y0, x1, y1, ...]``, or None when it is fine."""
    if not isinstance(poly, list) or len(poly) % 2 or not all(isinstance(v, (int, float)) for v in poly):
        return "malformed polygon", "a polygon must be a flat list of x, y numbers of even length"
    if len(poly) < 6:
        return "polygon with < 3 points", f"{len(poly) // 2} points"
    shape = shapely.Polygon(list(zip(poly[::2], poly[1::2])))
    if shape.area <= 0:
        return "zero-area polygon", f"{len(poly) // 2} points enclosing no area"
    if not shape.is_valid:
        return "self-intersecting polygon", shapely.is_valid_reason(shape)
    return None


def mask_box(segm: Any, height: int, width: int) -> list[float] | None:
    """The tight ``xywh`` box of a segmentation, or None when there is none.

    Polygons use their coordinate extent rather than the rasterised mask: rasterising rounds
    to whole pixels, which would flag tiny (3-4 px) objects whose boxes are in fact exact.
    """
    if isinstance(segm, list) and segm:
        xs = [v for poly in segm for v in poly[::2]]
        ys = [v for poly in segm for v in poly[1::2]]
        return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    if isinstance(segm, dict):
        box = rle_to_xywh(segmentation_to_rle(segm, height, width))
        return box if box[2] > 0 and box[3] > 0 else None
    return None


def box_iou(a: Iterable[float], b: Iterable[float]) -> float:
    """IoU of two ``xywh`` boxes."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def _edge_gap(a: list[float], b: list[float]) -> float:
    """Largest distance between corresponding edges of two ``xywh`` boxes."""
    return max(abs(a[0] - b[0]), abs(a[1] - b[1]), abs(a[0] + a[2] - b[0] - b[2]), abs(a[1] + a[3] - b[1] - b[3]))


def fix_coco(ann_file: str | Path, unusable_images: Iterable[int] = ()) -> tuple[dict[str, Any], Counter]:
    """A repaired copy of a COCO JSON and the number of changes per action.

    Drops images in ``unusable_images`` (from :attr:`ValidationReport.unusable_images`) with their
    annotations, and annotations with an unknown category or image, a bad segmentation or RLE size,
    or a zero-area / fully outside box; removes degenerate polygons (the annotation goes when none is
    left); clips boxes to the image; recomputes boxes from the mask when missing or inconsistent;
    renumbers duplicate annotation ids. Kinds in :data:`UNFIXABLE` are left as they are.
    """
    raw = copy.deepcopy(read_coco_json(Path(ann_file)))
    actions: Counter = Counter()
    unusable = set(unusable_images)
    if unusable:
        actions["dropped unusable image"] = sum(1 for img in raw["images"] if _id_of(img) in unusable)
        raw["images"] = [img for img in raw["images"] if _id_of(img) not in unusable]
    category_ids = _check_categories(raw["categories"], ValidationReport(str(ann_file)))
    images = _check_image_entries(raw["images"], ValidationReport(str(ann_file)))
    kept: list[dict[str, Any]] = []
    for ann in raw["annotations"]:
        if not isinstance(ann, dict):
            actions["dropped malformed annotation"] += 1
            continue
        if _int(ann.get("image_id")) in unusable:
            actions["dropped annotation of unusable image"] += 1
            continue
        fixed = _fix_annotation(ann, images.get(_int(ann.get("image_id"))), category_ids, actions)
        if fixed is not None:
            kept.append(fixed)
    seen: set[int] = set()
    next_id = max((a["id"] for a in kept if isinstance(a.get("id"), int)), default=0) + 1
    for ann in kept:
        if not isinstance(ann.get("id"), int) or ann["id"] in seen:
            ann["id"], next_id = next_id, next_id + 1
            actions["renumbered annotation id"] += 1
        seen.add(ann["id"])
    raw["annotations"] = kept
    return raw, actions


def _fix_annotation(ann: dict[str, Any], img: dict[str, Any] | None, category_ids: set[int],
                    actions: Counter) -> dict[str, Any] | None:
    """One repaired annotation, or None when it is dropped; counts what it did in ``actions``."""
    kinds = {k for k, _ in annotation_problems(ann, img, category_ids)}
    if drop := sorted(kinds & _DROP_KINDS):
        actions[f"dropped annotation: {drop[0]}"] += 1
        return None
    assert img is not None  # "unknown image id" is a drop kind
    H, W = img["height"], img["width"]
    if kinds & _POLYGON_KINDS:
        good = [p for p in ann["segmentation"] if (q := polygon_problem(p)) is None or q[0] not in _POLYGON_KINDS]
        actions["removed degenerate polygon"] += len(ann["segmentation"]) - len(good)
        if not good:
            actions["dropped annotation: no valid polygon left"] += 1
            return None
        ann = {**ann, "segmentation": good}
        kinds = {k for k, _ in annotation_problems(ann, img, category_ids)}
    if "missing bbox" in kinds or "box inconsistent with mask" in kinds:
        tight = mask_box(ann.get("segmentation"), H, W)
        if tight is None:
            actions["dropped annotation: no box and no mask"] += 1
            return None
        ann = {**ann, "bbox": tight}
        kinds = {k for k, _ in annotation_problems(ann, img, category_ids)}
        if drop := sorted(kinds & _DROP_KINDS):  # e.g. the mask lies wholly outside the image
            actions[f"dropped annotation: {drop[0]}"] += 1
            return None
        actions["recomputed bbox from mask"] += 1
    if "box beyond image border" in kinds:
        x, y, w, h = ann["bbox"]
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(W)), min(y + h, float(H))
        ann = {**ann, "bbox": [x1, y1, x2 - x1, y2 - y1]}
        actions["clipped box to image"] += 1
    return ann


def _int(value: Any) -> int | None:
    """``value`` when it is an int (not a bool), else None: ids from a JSON may be any type, even unhashable."""
    return value if type(value) is int else None


def _id_of(entry: Any) -> int | None:
    return _int(entry.get("id")) if isinstance(entry, dict) else None


def _check_categories(categories: list[Any], report: ValidationReport) -> set[int]:
    ids = []
    for i, cat in enumerate(categories):
        if isinstance(cat, dict) and type(cat.get("id")) is int and isinstance(cat.get("name"), str):
            ids.append(cat["id"])
        else:
            report.add("malformed category entry", f"categories[{i}] needs an integer 'id' and a string 'name'")
    for cid, n in Counter(ids).items():
        if n > 1:
            report.add("duplicate category id", f"category id {cid!r} appears {n} times")
    return set(ids)


def _check_image_entries(entries: list[Any], report: ValidationReport) -> dict[int, dict[str, Any]]:
    """Image id -> entry for well-formed entries; the first one wins for duplicate ids."""
    images: dict[int, dict[str, Any]] = {}
    by_name: dict[str, int] = {}
    for i, img in enumerate(entries):
        fields = (("id", int), ("file_name", str), ("height", int), ("width", int))
        if not isinstance(img, dict) or not all(isinstance(img.get(k), t) for k, t in fields):
            report.add("malformed image entry", f"images[{i}] needs integer id/height/width and a file_name")
        elif img["height"] <= 0 or img["width"] <= 0:
            report.add("malformed image entry", f"images[{i}] ({img['file_name']}): size {img['width']}x"
                                                f"{img['height']}; fields 'width' and 'height' must be > 0")
        elif img["id"] in images:
            report.add("duplicate image id", f"image id {img['id']} ({img['file_name']} and "
                                             f"{images[img['id']]['file_name']})")
        else:
            if img["file_name"] in by_name:
                report.add("duplicate file_name", f"images[{i}] (id {img['id']}) repeats file_name "
                                                  f"{img['file_name']!r} of image id {by_name[img['file_name']]}")
            by_name.setdefault(img["file_name"], img["id"])
            images[img["id"]] = img
    return images


def _image_problem(path: Path, img: dict[str, Any]) -> tuple[str | None, str]:
    """``(kind, detail)`` for a missing, unreadable or wrongly sized image file; ``(None, "")`` if fine."""
    if not path.is_file():
        return "missing image file", f"{path} not found"
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            # PIL cannot open multiband or float GeoTIFFs, which are common in remote sensing.
            height, width = image_size(path)
        else:
            with Image.open(path) as im:
                width, height = im.size
                im.verify()  # reads the whole file: catches truncated downloads
    except Exception as err:  # any decoder failure means training would crash on this file
        return "unreadable image", f"{path}: {type(err).__name__}: {err}"
    if (height, width) != (img["height"], img["width"]):
        return "image size mismatch", f"file is {width}x{height}, JSON says {img['width']}x{img['height']}"
    return None, ""
