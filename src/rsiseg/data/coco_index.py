"""Loading and checking a COCO instances JSON before any training starts.

Every problem is either an error that names the file, the image and the annotation id, or,
when ``repair=True``, a counted skip/repair recorded in a :class:`DataReport` that the caller
prints at the end. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsiseg.data.io import MAX_PIXELS_ENV, pixel_limit
from rsiseg.structures import rle_area, rle_problem, segmentation_to_rle

log = logging.getLogger(__name__)

BOX_TOLERANCE_PX = 1.0  # exporters round coordinates; a box may overhang the border by this much
# A coordinate more than one image size beyond the border (x < -W or x > 2W) is a corrupt value, not
# rounding; rasterising it (or a NaN) makes pycocotools allocate gigabytes, so it never gets that far.
FAR_OUTSIDE_FACTOR = 2.0
NON_FINITE, FAR_OUTSIDE = "non-finite number", "coordinate far outside image"
REPAIR_HINT = ("to skip and count such annotations: data.repair=true in a training config, or write a "
               "repaired copy with `rsiseg data validate --fix OUT.json`")


class DataError(ValueError):
    """Bad input data; the message names the file and the image or annotation at fault."""


@dataclass
class DataReport:
    """Counts of annotations skipped or repaired, by kind, with the first few examples."""

    source: str
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < 3:
            shown.append(example)

    def summary(self) -> str:
        if not self.counts:
            return f"{self.source}: no annotations skipped or repaired"
        lines = [f"{self.source}: {sum(self.counts.values())} annotations skipped or repaired"]
        for kind, n in self.counts.most_common():
            lines.append(f"  {n:6d}  {kind}  (e.g. {'; '.join(self.examples[kind])})")
        return "\n".join(lines)


@dataclass
class CocoIndex:
    """A checked COCO dataset: images, their usable annotations and the category mapping.

    Attributes:
        images: image entries in file order (possibly fewer than in the JSON after repairs).
        anns_by_image: image id -> list of annotation dicts (crowd ones included, flagged by iscrowd).
        categories: category entries sorted by id; label ``i + 1`` is ``categories[i]``.
        report: what was skipped or repaired.
    """

    ann_file: Path
    image_dir: Path
    images: list[dict[str, Any]]
    anns_by_image: dict[int, list[dict[str, Any]]]
    categories: list[dict[str, Any]]
    report: DataReport

    @property
    def category_to_label(self) -> dict[int, int]:
        return {c["id"]: i + 1 for i, c in enumerate(self.categories)}

    @property
    def label_to_category(self) -> list[int]:
        """Category ids in label order: ``[i]`` is the category id of label ``i + 1``."""
        return [c["id"] for c in self.categories]

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def to_coco(self) -> dict[str, Any]:
        """The checked dataset as a COCO dict (the ground truth used for evaluation)."""
        anns = [a for img in self.images for a in self.anns_by_image[img["id"]]]
        return {"images": self.images, "annotations": anns, "categories": self.categories}


def load_coco_index(ann_file: str | Path, image_dir: str | Path | None, repair: bool = False) -> CocoIndex:
    """Read and check a COCO instances JSON (``image_dir`` None: every check but that the image files exist,
    for tools that read annotations only; the index's ``image_dir`` is then the JSON's folder).

    Raises:
        DataError: on malformed JSON, missing fields, missing image files, bad polygons, boxes
            outside the image or of zero area, unknown category or image ids, duplicate ids.
            With ``repair=True`` per-annotation and missing-image problems become counted skips.
    """
    ann_file = Path(ann_file)
    image_dir = Path(image_dir) if image_dir is not None else None
    raw = read_coco_json(ann_file)
    report = DataReport(str(ann_file))
    checker = _Checker(ann_file, image_dir, repair, report)
    categories = checker.categories(raw)
    if not raw["images"]:
        raise DataError(f"{ann_file}: field 'images' is empty, so there is nothing to train or evaluate on")
    images = checker.images(raw)
    anns_by_image = checker.annotations(raw, images, {c["id"] for c in categories})
    kept = [img for img in images if img["id"] not in checker.dropped_images]
    if report.counts:
        log.warning(report.summary())
    return CocoIndex(ann_file, image_dir or ann_file.parent, kept, anns_by_image, categories, report)


def number_problem(ann: dict[str, Any], width: int, height: int) -> tuple[str, str] | None:
    """The first non-finite or absurd number of an annotation's ``bbox``, polygons or ``area``.

    Only numeric values are looked at; malformed fields are the other checks' business.

    Returns:
        ``(kind, detail)`` with kind :data:`NON_FINITE` or :data:`FAR_OUTSIDE` and a detail naming
        the field, or None when every number is finite and within ``FAR_OUTSIDE_FACTOR`` image sizes.
    """
    fields: list[tuple[str, list[Any]]] = []
    bbox = ann.get("bbox")
    if isinstance(bbox, list) and len(bbox) == 4:
        fields.append(("bbox", bbox))
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        fields += [(f"segmentation[{k}]", poly) for k, poly in enumerate(segm) if isinstance(poly, list)]
    area = ann.get("area")
    for name, values in fields + [("area", [area])]:
        bad = [v for v in values if _is_number(v) and not math.isfinite(v)]
        if bad:
            return NON_FINITE, f"field {name!r} holds {bad[0]}"
    f = FAR_OUTSIDE_FACTOR
    x_range, y_range = (-(f - 1) * width, f * width), (-(f - 1) * height, f * height)
    for name, values in fields:
        if not all(_is_number(v) for v in values):
            continue
        points = values if name != "bbox" else [values[0], values[1], values[0] + values[2], values[1] + values[3]]
        for x, y in zip(points[0::2], points[1::2]):
            if not (x_range[0] <= x <= x_range[1] and y_range[0] <= y <= y_range[1]):
                return FAR_OUTSIDE, (f"field {name!r} reaches ({x:g}, {y:g}), more than {f:g}x the "
                                     f"{width}x{height} image")
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_coco_json(path: Path) -> dict[str, Any]:
    """Read a COCO JSON with ``images``, ``annotations`` and ``categories`` lists.

    Raises:
        DataError: missing file, malformed JSON or a missing list, naming the file and field.
    """
    try:
        with open(path) as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: malformed JSON: {err}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a COCO object at the top level, got {type(raw).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw.get(key), list):
            raise DataError(f"{path}: field {key!r} is missing or not a list")
    return raw


class _Checker:
    """Runs the checks; raises or records in the report depending on ``repair``."""

    def __init__(self, ann_file: Path, image_dir: Path | None, repair: bool, report: DataReport) -> None:
        self.ann_file, self.image_dir, self.repair, self.report = ann_file, image_dir, repair, report
        self.dropped_images: set[int] = set()

    def fail(self, kind: str, where: str, detail: str) -> None:
        """Raise, or count a skip when repairing."""
        message = f"{self.ann_file}: {where}: {detail}"
        if not self.repair:
            raise DataError(f"{message} ({REPAIR_HINT})")
        self.report.add(kind, where)

    def categories(self, raw: dict[str, Any]) -> list[dict[str, Any]]:
        cats = raw["categories"]
        for i, cat in enumerate(cats):
            if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
                raise DataError(f"{self.ann_file}: categories[{i}] needs an integer 'id' and a 'name'")
        ids = [c["id"] for c in cats]
        if len(set(ids)) != len(ids):
            raise DataError(f"{self.ann_file}: duplicate category ids {sorted(i for i in ids if ids.count(i) > 1)}")
        if not cats:
            raise DataError(f"{self.ann_file}: field 'categories' is empty")
        return sorted(cats, key=lambda c: c["id"])

    def images(self, raw: dict[str, Any]) -> list[dict[str, Any]]:
        seen: set[int] = set()
        limit = pixel_limit()
        for i, img in enumerate(raw["images"]):
            if not isinstance(img, dict):
                raise DataError(f"{self.ann_file}: images[{i}] is not an object")
            for key, kind in (("id", int), ("file_name", str), ("height", int), ("width", int)):
                if not isinstance(img.get(key), kind):
                    raise DataError(f"{self.ann_file}: images[{i}] field {key!r} is missing or not {kind.__name__}")
            if img["height"] <= 0 or img["width"] <= 0:
                raise DataError(f"{self.ann_file}: images[{i}] ({img['file_name']}) has size "
                                f"{img['width']}x{img['height']}; fields 'width' and 'height' must be > 0")
            if img["height"] * img["width"] > limit:  # the rasteriser would try to fill it
                raise DataError(f"{self.ann_file}: images[{i}] ({img['file_name']}) claims "
                                f"{img['width']}x{img['height']} pixels, over the limit of {limit}; raise it with "
                                f"the environment variable {MAX_PIXELS_ENV}=N if the file is right")
            if img["id"] in seen:
                raise DataError(f"{self.ann_file}: duplicate image id {img['id']} ({img['file_name']})")
            seen.add(img["id"])
            if self.image_dir is None:  # annotations only
                continue
            path = self.image_dir / img["file_name"]
            if not path.is_file():
                self.fail("missing image file", f"image id {img['id']} ({path})", "image file not found")
                self.dropped_images.add(img["id"])
        return raw["images"]

    def annotations(
        self, raw: dict[str, Any], images: list[dict[str, Any]], category_ids: set[int]
    ) -> dict[int, list[dict[str, Any]]]:
        by_id = {img["id"]: img for img in images}
        out: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in images}
        seen: set[int] = set()
        for i, ann in enumerate(raw["annotations"]):
            if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
                raise DataError(f"{self.ann_file}: annotations[{i}] has no integer 'id'")
            if ann["id"] in seen:
                raise DataError(f"{self.ann_file}: duplicate annotation id {ann['id']}")
            seen.add(ann["id"])
            image_id = ann.get("image_id")
            img = by_id.get(image_id) if type(image_id) is int else None
            if img is None:
                self.fail("unknown image id", f"annotation id {ann['id']}", f"unknown image_id {ann.get('image_id')!r}")
                continue
            if img["id"] in self.dropped_images:
                continue
            checked = self.annotation(ann, img, category_ids)
            if checked is not None:
                out[img["id"]].append(checked)
        return out

    def annotation(self, ann: dict[str, Any], img: dict[str, Any], category_ids: set[int]) -> dict[str, Any] | None:
        """One annotation, returned (possibly repaired) or None when skipped."""
        where = f"annotation id {ann['id']} (image {img['file_name']})"
        if type(ann.get("category_id")) is not int or ann["category_id"] not in category_ids:
            self.fail("unknown category id", where, f"unknown category_id {ann.get('category_id')!r}")
            return None
        problem = number_problem(ann, img["width"], img["height"])
        if problem is not None:
            self.fail(problem[0], where, problem[1])
            return None
        segm = ann.get("segmentation")
        if isinstance(segm, list):
            segm = self.polygons(segm, where)
            if segm is None:
                return None
        elif isinstance(segm, dict):
            problem = rle_problem(segm, img["height"], img["width"])
            if problem is not None:
                self.fail("bad RLE", where, problem)
                return None
        elif segm is not None:
            self.fail("bad segmentation", where, f"segmentation of type {type(segm).__name__}")
            return None
        bbox = self.box(ann.get("bbox"), img, where)
        if bbox is None:
            return None
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1):
            self.fail("bad iscrowd", where, f"field 'iscrowd' must be 0 or 1, got {iscrowd!r}")
            return None
        area = ann.get("area")
        if not isinstance(area, (int, float)):
            # COCO evaluation needs the area for its size ranges; derive it as pycocotools would.
            area = rle_area(segmentation_to_rle(segm, img["height"], img["width"])) if segm else bbox[2] * bbox[3]
        return {**ann, "segmentation": segm, "bbox": bbox, "area": area, "iscrowd": int(iscrowd)}

    def polygons(self, segm: list[Any], where: str) -> list[list[float]] | None:
        good = []
        for poly in segm:
            if not isinstance(poly, list) or len(poly) % 2 or not all(isinstance(v, (int, float)) for v in poly):
                self.fail("malformed polygon", where, "a polygon must be a flat list of x, y numbers")
            elif len(poly) < 6:
                self.fail("polygon with < 3 points", where, f"polygon with {len(poly) // 2} points (need >= 3)")
            else:
                good.append(poly)
        return good or None

    def box(self, bbox: Any, img: dict[str, Any], where: str) -> list[float] | None:
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            self.fail("missing bbox", where, f"field 'bbox' must be [x, y, w, h], got {bbox!r}")
            return None
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            self.fail("zero-area box", where, f"box {bbox} has zero area")
            return None
        W, H, tol = img["width"], img["height"], BOX_TOLERANCE_PX
        if x < -tol or y < -tol or x + w > W + tol or y + h > H + tol:
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(W)), min(y + h, float(H))
            if x2 <= x1 or y2 <= y1:
                self.fail("box outside image", where, f"box {bbox} lies outside the {W}x{H} image")
                return None
            self.fail("box clipped to image", where, f"box {bbox} extends beyond the {W}x{H} image")
            return [x1, y1, x2 - x1, y2 - y1]
        return [x, y, w, h]
