"""One point per object: the point prompts of PointSAM, drawn from instance masks or read from a file.

A point lies inside its object's mask. Rule ``center`` takes the mask pixel farthest from the
mask's border (the image edge counts as border, so an object cut by the edge gets its point away
from the cut); rule ``random`` takes a uniformly random mask pixel, a pure function of
``(seed, image key, instance index)`` so that every run, worker and resume sees the same points.

Points are ``(x, y)`` float64 image-pixel coordinates, ``x`` along columns: pixel ``(row r, col c)``
covers ``[c, c + 1) x [r, r + 1)`` (as in :mod:`rsiseg.masks`), and a drawn point is the pixel
centre ``(c + 0.5, r + 0.5)``.

The points JSON (written by :func:`points_from_coco` / ``rsiseg data points``)::

    {"info": {"source": "instances.json", "rule": "center", "seed": 0},
     "categories": [{"id": 1, "name": "ship"}, ...],          # copied from the COCO file, sorted by id
     "images": [{"id": 7, "file_name": "P0001.png", "width": 800, "height": 800}, ...],
     "points": [{"image_id": 7, "annotation_id": 12, "category_id": 1, "x": 15.5, "y": 23.5}, ...]}

:func:`read_instance_points` reads it, or the semantic point files of :mod:`rsiseg.data.points`
(CSV ``image,x,y,class``; GeoJSON ``Point`` features with properties ``image`` and ``class``).
Their ``class`` is a class name (label = its index in ``class_names`` + 1) or an integer taken as
the 1-based label itself (1..K; 0 is the background, so it is refused), unlike the 0-based class
indices of the semantic reader.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from rsiseg.config import POINT_RULES
from rsiseg.data.coco_index import DataError, load_coco_index
from rsiseg.data.points import PointRow, csv_point_rows, geojson_point_rows, point_coordinate
from rsiseg.fileio import atomic_write
from rsiseg.masks import InstanceMasks

MAX_EXAMPLES = 5  # annotation ids named per kind of skip

InstancePointSet = tuple[np.ndarray, np.ndarray]  # float64 [P, 2] (x, y), int64 [P] labels 1..K


def interior_point(bitmap: np.ndarray, rule: str = "center", rng: np.random.Generator | None = None) -> tuple[int, int]:
    """A pixel inside one binary mask.

    Args:
        bitmap: uint8 or bool ``[h, w]``; nonzero pixels are the object.
        rule: ``center``: the pixel farthest (Euclidean) from the border, where background pixels
            and the array's edge both count as border; ties go to the pixel nearest the mask's
            centroid, then to the first in raster order (a plain raster-order tie-break would put the
            point of an elongated box near its left end). ``random``: a uniformly drawn mask pixel.
        rng: the generator of ``random`` (required then; unused by ``center``).

    Returns:
        ``(col, row)`` integer indices into ``bitmap``.

    Raises:
        ValueError: an empty or non-2-D mask, an unknown rule, or ``random`` without ``rng``.
    """
    _check_rule(rule)
    mask = np.asarray(bitmap) != 0
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    pixels = np.flatnonzero(mask)
    if not pixels.size:
        raise ValueError("the mask is empty, so it has no interior point")
    if rule == "random":
        if rng is None:
            raise ValueError("rule 'random' needs a numpy Generator (rng)")
        chosen = int(pixels[rng.integers(pixels.size)])
    else:
        # One pixel of background padding makes the array edge a border like any other.
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1].ravel()
        # EDT values are square roots of integers, so equal distances compare exactly equal.
        tied = np.flatnonzero(dist == dist.max())
        rows, cols = np.divmod(pixels, mask.shape[1])
        tied_rows, tied_cols = np.divmod(tied, mask.shape[1])
        off_centre = (tied_rows - rows.mean()) ** 2 + (tied_cols - cols.mean()) ** 2
        chosen = int(tied[np.argmin(off_centre)])  # argmin keeps the first (raster order) of equal ones
    row, col = divmod(chosen, mask.shape[1])
    return int(col), int(row)


def instance_points(masks: InstanceMasks, rule: str, seed: int = 0, key: str = "") -> np.ndarray:
    """The interior point of every instance of one image, from the instance crops alone.

    Args:
        masks: the N instances of the image.
        rule: ``center`` or ``random`` (see :func:`interior_point`).
        seed: seed of ``random``, an integer >= 0.
        key: names the image (e.g. its file name); instance ``i`` draws from a generator seeded by
            ``(seed, crc32(key), i)``, so the draw does not depend on which images came before.

    Returns:
        float64 ``[N, 2]`` ``(x, y)`` pixel centres in image pixels; NaN rows for empty instances.
    """
    _check_rule(rule)
    _check_seed(seed)
    out = np.full((len(masks), 2), np.nan, dtype=np.float64)
    key_hash = zlib.crc32(key.encode())
    for i in range(len(masks)):
        crop = masks.local_mask(i)
        if not crop.mask.any():
            continue
        rng = np.random.default_rng([seed, key_hash, i]) if rule == "random" else None
        col, row = interior_point(crop.mask, rule, rng)
        out[i] = (crop.x0 + col + 0.5, crop.y0 + row + 0.5)
    return out


@dataclass
class PointsReport:
    """What :func:`points_from_coco` made: ``annotations == points + skipped_empty + skipped_crowd``."""

    source: str
    images: int = 0
    annotations: int = 0
    points: int = 0
    skipped_empty: int = 0
    skipped_crowd: int = 0
    empty_examples: list[int] = field(default_factory=list)  # first few annotation ids without mask pixels

    def summary(self) -> str:
        empty = f"{self.skipped_empty} with an empty mask skipped"
        if self.empty_examples:
            more = ", ..." if self.skipped_empty > len(self.empty_examples) else ""
            empty += f" (annotation ids {', '.join(map(str, self.empty_examples))}{more})"
        return (f"{self.source}: {self.points} points from {self.annotations} annotations in {self.images} images; "
                f"{self.skipped_crowd} crowd skipped, {empty}")


def points_from_coco(ann_file: str | Path, rule: str = "center", seed: int = 0,
                     progress: bool = False) -> tuple[dict[str, Any], PointsReport]:
    """One point per non-crowd annotation of a COCO instances JSON.

    The file gets the checks of :func:`rsiseg.data.coco_index.load_coco_index` (without repairs),
    except that the image files need not exist: points come from the annotations alone.

    Args:
        ann_file: COCO instances JSON (polygon or RLE segmentations).
        rule: ``center`` or ``random`` (see :func:`interior_point`); the image key is its id as a
            string, as :mod:`rsiseg.data.point_prompts` keys it, so without augmentation the two agree.
        seed: seed of ``random``, an integer >= 0 (recorded, and ignored, with ``center``).
        progress: show a tqdm bar over the images.

    Returns:
        The points JSON (see the module docstring; images and points in file order) and the report.
        Annotations without mask pixels (tiny polygons, empty RLE, no segmentation) get no point.

    Raises:
        DataError: a malformed file, naming the file and the image or annotation at fault.
        ValueError: an unknown rule or a bad seed.
    """
    _check_rule(rule)
    _check_seed(seed)
    ann_file = Path(ann_file)
    index = load_coco_index(ann_file, None)  # the dataset's checks, without needing the image files
    categories, images, anns_by_image = index.categories, index.images, index.anns_by_image
    report = PointsReport(str(ann_file), images=len(images))
    points: list[dict[str, Any]] = []
    for img in tqdm(images, desc="points", disable=not progress):
        anns = anns_by_image[img["id"]]
        kept = [a for a in anns if not a["iscrowd"]]
        report.annotations += len(anns)
        report.skipped_crowd += len(anns) - len(kept)
        try:
            masks = InstanceMasks.from_coco([a["segmentation"] or [] for a in kept], img["height"], img["width"])
        except ValueError as err:  # the checks should have caught it; still name the image
            raise DataError(f"{ann_file}: image {img['file_name']}: {err}") from None
        for ann, (x, y) in zip(kept, instance_points(masks, rule, seed, key=str(img["id"])).tolist()):
            if math.isnan(x):
                report.skipped_empty += 1
                if len(report.empty_examples) < MAX_EXAMPLES:
                    report.empty_examples.append(ann["id"])
                continue
            points.append({"image_id": img["id"], "annotation_id": ann["id"], "category_id": ann["category_id"],
                           "x": x, "y": y})
    report.points = len(points)
    data = {"info": {"source": str(ann_file), "rule": rule, "seed": seed}, "categories": categories,
            "images": [{k: img[k] for k in ("id", "file_name", "width", "height")} for img in images],
            "points": points}
    return data, report


def write_points_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write a points JSON atomically (a reader never sees half a file); returns the path."""
    return atomic_write(path, lambda handle: json.dump(data, handle))


def read_instance_points(path: str | Path, class_names: Sequence[str] | None = None) -> dict[str, InstancePointSet]:
    """The points of :func:`read_point_file`, without the categories."""
    return read_point_file(path, class_names)[0]


def read_point_file(path: str | Path, class_names: Sequence[str] | None = None,
                    ) -> tuple[dict[str, InstancePointSet], list[dict[str, Any]] | None]:
    """Read instance points: a points JSON (a JSON object with ``points``), a CSV or a GeoJSON file.

    Args:
        path: a points JSON, a ``.csv`` file, or a GeoJSON ``FeatureCollection``.
        class_names: the K classes in label order. Points JSON categories map to them by name
            (without it, label = position in the file's ``categories`` + 1); CSV/GeoJSON classes may
            be names only with it, and integer labels are checked against 1..K.

    Returns:
        ``{image file name (folders dropped): (float64 [P, 2] (x, y) pixels, int64 [P] labels 1..K)}``,
        points in file order, and the points JSON's ``categories`` (None for CSV and GeoJSON). Every
        image of a points JSON has an entry, possibly empty; CSV and GeoJSON list only the images named.

    Raises:
        DataError: an unreadable file, or an entry with a missing or bad field (a non-number,
            non-finite or negative coordinate, a point outside its image, an unknown image or class),
            naming the file, the entry (``points[i]``, ``line n``, ``feature i``) and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: point file not found")
    if path.suffix.lower() == ".csv":
        return _from_rows(path, csv_point_rows(path), class_names), None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable points JSON or GeoJSON file ({type(err).__name__}: {err})") from None
    if isinstance(data, dict) and "points" in data:
        return _from_points_json(path, data, class_names), data["categories"]
    if not isinstance(data, dict) or "features" not in data:
        raise DataError(f"{path}: expected a points JSON (an object with 'points') or a GeoJSON "
                        f"FeatureCollection (an object with 'features')")
    return _from_rows(path, geojson_point_rows(path), class_names), None


def _from_rows(path: Path, rows: list[PointRow], class_names: Sequence[str] | None) -> dict[str, InstancePointSet]:
    lookup = {name: i + 1 for i, name in enumerate(class_names or [])}
    grouped: dict[str, tuple[list[tuple[float, float]], list[int]]] = {}
    for where, image, x, y, cls in rows:
        xy = tuple(point_coordinate(v, f"{path}: {where}: field '{axis}'") for v, axis in ((x, "x"), (y, "y")))
        label = _label(cls, lookup, class_names, f"{path}: {where}: field 'class'")
        coords, labels = grouped.setdefault(Path(str(image)).name, ([], []))
        coords.append(xy)
        labels.append(label)
    return {name: _arrays(c, k) for name, (c, k) in grouped.items()}


def _from_points_json(path: Path, data: dict[str, Any], class_names: Sequence[str] | None) -> dict[str, InstancePointSet]:
    for key in ("categories", "images", "points"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: field {key!r} is missing or not a list")
    labels = _category_labels(path, data["categories"], class_names)
    sizes: dict[int, tuple[str, int, int]] = {}
    grouped: dict[str, tuple[list[tuple[float, float]], list[int]]] = {}
    for i, img in enumerate(data["images"]):
        for key, kind in (("id", int), ("file_name", str), ("width", int), ("height", int)):
            if not isinstance(img, dict) or type(img.get(key)) is not kind:
                raise DataError(f"{path}: images[{i}]: field {key!r} is missing or not {kind.__name__}")
        name = Path(img["file_name"]).name
        if img["id"] in sizes or name in grouped:
            raise DataError(f"{path}: images[{i}]: duplicate image id {img['id']} or file name {name!r}")
        sizes[img["id"]] = (name, img["width"], img["height"])
        grouped[name] = ([], [])
    for i, point in enumerate(data["points"]):
        where = f"{path}: points[{i}]"
        if not isinstance(point, dict):
            raise DataError(f"{where}: not an object")
        image_id, category_id = point.get("image_id"), point.get("category_id")
        if type(image_id) is not int or image_id not in sizes:
            raise DataError(f"{where}: field 'image_id': {image_id!r} names no entry of 'images'")
        if type(category_id) is not int or category_id not in labels:
            raise DataError(f"{where}: field 'category_id': {category_id!r} names no entry of 'categories'")
        name, width, height = sizes[image_id]
        x, y = (point_coordinate(point.get(axis), f"{where}: field '{axis}'") for axis in ("x", "y"))
        if x >= width or y >= height:
            raise DataError(f"{where}: point ({x:g}, {y:g}) is outside the {width} x {height} image {name}")
        grouped[name][0].append((x, y))
        grouped[name][1].append(labels[category_id])
    return {name: _arrays(c, k) for name, (c, k) in grouped.items()}


def _category_labels(path: Path, categories: list[Any], class_names: Sequence[str] | None) -> dict[int, int]:
    """Category id -> label 1..K: by name in ``class_names``, else by position in the file."""
    lookup = {name: i + 1 for i, name in enumerate(class_names)} if class_names is not None else None
    labels: dict[int, int] = {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or type(cat.get("id")) is not int or not isinstance(cat.get("name"), str):
            raise DataError(f"{path}: categories[{i}] needs an integer 'id' and a string 'name'")
        if cat["id"] in labels:
            raise DataError(f"{path}: categories[{i}]: field 'id': duplicate category id {cat['id']}")
        if lookup is not None and cat["name"] not in lookup:
            raise DataError(f"{path}: categories[{i}]: field 'name': {cat['name']!r} is not among the class "
                            f"names {list(class_names or [])}")
        labels[cat["id"]] = lookup[cat["name"]] if lookup is not None else i + 1
    return labels


def _arrays(coords: list[tuple[float, float]], labels: list[int]) -> InstancePointSet:
    return np.array(coords, dtype=np.float64).reshape(-1, 2), np.array(labels, dtype=np.int64)


def _label(value: Any, lookup: dict[str, int], class_names: Sequence[str] | None, where: str) -> int:
    """A class name (label = index in ``class_names`` + 1) or an integer 1-based label."""
    if isinstance(value, str) and value in lookup:
        return lookup[value]
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise DataError(f"{where}: not a class label or name: {value!r}")
    try:
        label = int(value)
    except (TypeError, ValueError):
        known = f"; known: {list(class_names)}" if class_names else " (no class names given)"
        raise DataError(f"{where}: unknown class {value!r}{known}") from None
    if label < 1 or (class_names and label > len(class_names)):
        valid = f"1..{len(class_names)}" if class_names else ">= 1"
        raise DataError(f"{where}: class label {value!r} is not in {valid} (integer classes are 1-based labels; "
                        f"0 is the background)")
    return label


def _check_rule(rule: str) -> None:
    if rule not in POINT_RULES:
        raise ValueError(f"point rule must be one of {POINT_RULES}, got {rule!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
