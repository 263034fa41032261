"""Sparse point labels for point-supervised semantic segmentation: drawn from dense labels, or read from a file.

Points are ``(row, col)`` pixel indices, int64 ``[P, 2]``. A draw is a pure function of
``(seed, key)`` (``key`` names the image), so every epoch, worker and resumed run sees the same points.

Point files list real annotations, one point per row or feature, in pixel coordinates of the
original image (``x`` = column, ``y`` = row; fractional values fall in the pixel they lie in):

- CSV with the header ``image,x,y,class``;
- GeoJSON ``FeatureCollection`` of ``Point`` features with properties ``image`` and ``class``.

``class`` is a class index, or a class name when ``class_names`` is given.
"""

from __future__ import annotations

import csv
import json
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rsiseg.config import POINT_SAMPLINGS, PointsConfig
from rsiseg.data.coco_index import DataError

PointSet = tuple[np.ndarray, np.ndarray]  # int64 [P, 2] (row, col), int64 [P] class indices
PointRow = tuple[str, Any, Any, Any, Any]  # (where, e.g. "line 3" or "feature 2"; image; x; y; class), unchecked


def sample_points(labels: np.ndarray, count: int, sampling: str, seed: int, key: str,
                  ignore_index: int = 255) -> np.ndarray:
    """Draw up to ``count`` distinct labelled pixels of a dense label map.

    Args:
        labels: uint8 ``[H, W]`` class indices; ``ignore_index`` marks unlabelled pixels.
        count: points wanted; the result has ``min(count, labelled pixels)`` of them.
        sampling: ``uniform`` (every labelled pixel equally likely) or ``stratified`` (an equal
            share per class present; a class with fewer pixels gives all it has and the rest
            is spread over the other classes).
        seed: the experiment's point seed.
        key: names the image (e.g. its file name), so each image gets its own draw.
        ignore_index: label value never drawn.

    Returns:
        int64 ``[P, 2]`` ``(row, col)``, in raster order.
    """
    if sampling not in POINT_SAMPLINGS:
        raise ValueError(f"data.points.sampling must be one of {POINT_SAMPLINGS}, got {sampling!r}")
    if count < 0:
        raise ValueError(f"point count must be >= 0, got {count}")
    flat = labels.ravel()
    labelled = np.flatnonzero(flat != ignore_index)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    total = min(count, labelled.size)
    if sampling == "uniform":
        chosen = rng.choice(labelled, total, replace=False)
    else:
        groups = [labelled[flat[labelled] == c] for c in np.unique(flat[labelled])]
        quotas = _stratified_quotas([g.size for g in groups], total)
        chosen = np.concatenate([rng.choice(g, q, replace=False) for g, q in zip(groups, quotas)] or [labelled[:0]])
    chosen = np.sort(chosen)
    return np.stack(np.unravel_index(chosen, labels.shape), axis=1).astype(np.int64)


def _stratified_quotas(sizes: Sequence[int], total: int) -> list[int]:
    """Points per class: water-filling, smallest classes first, so the quotas sum to ``total``.

    Each class gets ``remaining // classes left`` or all its pixels if fewer; the largest class
    takes what is left, which always fits because the classes are visited by increasing size.
    """
    quotas = [0] * len(sizes)
    remaining = total
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    for rank, i in enumerate(order):
        left = len(order) - rank
        quotas[i] = min(sizes[i], remaining if left == 1 else remaining // left)
        remaining -= quotas[i]
    return quotas


def count_for(cfg: PointsConfig, shape: tuple[int, int]) -> int:
    """Points per image of ``shape`` ``(H, W)``: ``cfg.count``, else ``round(cfg.fraction * H * W)`` (>= 1)."""
    if cfg.count is not None:
        return int(cfg.count)
    if cfg.fraction is None:
        raise ValueError("data.points needs a count or a fraction to draw points")
    return max(1, round(cfg.fraction * shape[0] * shape[1]))


def sparse_label_map(labels: np.ndarray, points: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """uint8 ``[H, W]``: ``labels`` at the ``(row, col)`` ``points`` (int ``[P, 2]``), ``ignore_index`` elsewhere."""
    sparse = np.full(labels.shape, ignore_index, dtype=np.uint8)
    rows, cols = points[:, 0], points[:, 1]
    sparse[rows, cols] = labels[rows, cols]
    return sparse


def point_label_map(shape: tuple[int, int], points: np.ndarray, classes: np.ndarray,
                    ignore_index: int = 255) -> np.ndarray:
    """uint8 ``[H, W]`` holding ``classes`` (int ``[P]``) at ``points`` (``(row, col)``), ``ignore_index`` elsewhere."""
    sparse = np.full(shape, ignore_index, dtype=np.uint8)
    sparse[points[:, 0], points[:, 1]] = classes
    return sparse


def read_point_file(path: str | Path, class_names: Sequence[str] | None = None) -> dict[str, PointSet]:
    """Read point annotations (CSV or GeoJSON, by suffix) keyed by image file name.

    Args:
        path: a ``.csv`` or ``.geojson`` / ``.json`` file.
        class_names: lets ``class`` be a name; indices are checked against its length.

    Returns:
        ``{image file name as given (folders dropped): (int64 [P, 2] (row, col), int64 [P] classes)}``
        (:class:`~rsiseg.data.semantic.SemanticDataset` matches names as it pairs labels). Coordinates are not yet
        checked against the image size: see :func:`check_points_inside`.

    Raises:
        DataError: unreadable file, or a row/feature with a missing field, a non-finite or negative
            coordinate or an unknown class, naming the file, the line or feature number and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: point file not found")
    rows = csv_point_rows(path) if path.suffix.lower() == ".csv" else geojson_point_rows(path)
    lookup = {name: i for i, name in enumerate(class_names or [])}
    points: dict[str, tuple[list[tuple[int, int]], list[int]]] = {}
    for where, image, x, y, cls in rows:
        col, row = (_coordinate(v, f"{path}: {where}: field '{axis}'") for v, axis in ((x, "x"), (y, "y")))
        coords, classes = points.setdefault(Path(str(image)).name, ([], []))
        coords.append((row, col))
        classes.append(_class_index(cls, lookup, class_names, f"{path}: {where}: field 'class'"))
    return {stem: (np.array(c, dtype=np.int64).reshape(-1, 2), np.array(k, dtype=np.int64))
            for stem, (c, k) in points.items()}


def check_points_inside(points: np.ndarray, shape: tuple[int, int], where: str) -> None:
    """Raise :class:`DataError` (prefixed by ``where``) when a ``(row, col)`` point is outside ``shape`` ``(H, W)``."""
    outside = (points[:, 0] >= shape[0]) | (points[:, 1] >= shape[1]) | (points < 0).any(axis=1)
    if outside.any():
        row, col = points[np.flatnonzero(outside)[0]]
        raise DataError(f"{where}: {int(outside.sum())} point(s) outside the {shape[1]} x {shape[0]} image, "
                        f"e.g. x={col}, y={row}")


def csv_point_rows(path: Path) -> list[PointRow]:
    """The rows of a CSV point file with the header ``image,x,y,class``, values as stripped strings.

    Shared with :mod:`rsiseg.data.instance_points`, which reads the same files for instance points.

    Raises:
        DataError: unreadable file, a header without one of the fields, or a row with an empty field,
            naming the file, the line and the field.
    """
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [f for f in ("image", "x", "y", "class") if f not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: line 1: the CSV header lacks field(s) {missing}; expected image,x,y,class")
            rows = []
            for line, record in enumerate(reader, start=2):
                values = [record.get(f) for f in ("image", "x", "y", "class")]
                for field, value in zip(("image", "x", "y", "class"), values):
                    if value is None or not str(value).strip():
                        raise DataError(f"{path}: line {line}: field '{field}' is missing")
                rows.append((f"line {line}", *(str(v).strip() for v in values)))
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read the CSV point file ({type(err).__name__}: {err})") from None


def geojson_point_rows(path: Path) -> list[PointRow]:
    """The ``Point`` features of a GeoJSON FeatureCollection with properties ``image`` and ``class``.

    Values are as in the file (numbers stay numbers); shared with :mod:`rsiseg.data.instance_points`.

    Raises:
        DataError: unreadable JSON, no ``features`` list, or a feature that is not a Point or lacks a
            property, naming the file, the feature number and the field.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable GeoJSON point file ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("features"), list):
        raise DataError(f"{path}: expected a GeoJSON FeatureCollection with a 'features' list")
    rows = []
    for i, feature in enumerate(data["features"]):
        where = f"feature {i}"
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        if not isinstance(geometry, dict) or geometry.get("type") != "Point":
            raise DataError(f"{path}: {where}: field 'geometry' must be a Point")
        coords = geometry.get("coordinates")
        if not isinstance(coords, list) or len(coords) < 2:
            raise DataError(f"{path}: {where}: field 'geometry.coordinates' must be [x, y]")
        props = feature.get("properties") or {}
        for field in ("image", "class"):
            if props.get(field) in (None, ""):
                raise DataError(f"{path}: {where}: field 'properties.{field}' is missing")
        rows.append((where, props["image"], coords[0], coords[1], props["class"]))
    return rows


def point_coordinate(value: Any, where: str) -> float:
    """A finite, non-negative pixel coordinate of a point file (fractional values kept).

    Raises:
        DataError: a missing, non-numeric, non-finite or negative value, naming ``where``.
    """
    if value is None:
        raise DataError(f"{where} is missing")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where} is not a number: {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise DataError(f"{where} is not a finite number: {value!r}")
    if number < 0:
        raise DataError(f"{where} is negative: {value!r}")
    return number


def _coordinate(value: Any, where: str) -> int:
    """The pixel a coordinate falls in."""
    return int(math.floor(point_coordinate(value, where)))


def _class_index(value: Any, lookup: dict[str, int], class_names: Sequence[str] | None, where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: not a class index or name: {value!r}")
    if isinstance(value, str) and value in lookup:
        return lookup[value]
    try:
        index = int(value)
    except (TypeError, ValueError):
        known = f"; known: {list(class_names)}" if class_names else " (no class names given)"
        raise DataError(f"{where}: unknown class {value!r}{known}") from None
    if index < 0 or (class_names and index >= len(class_names)):
        valid = f"0..{len(class_names) - 1}" if class_names else ">= 0"
        raise DataError(f"{where}: class index {value!r} is not in {valid}")
    return index
