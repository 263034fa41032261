"""ISPRS Potsdam RGB label tiles to class-index masks for point-supervised semantic segmentation.

Layout read: every ``*label*.tif`` or ``*label*.png`` under ``SRC`` (any depth). Written:
``OUT/masks/<stem>.png`` (``uint8`` class indices) and ``OUT/classes.json`` (names, palette,
ignore index). Colours outside the standard palette (anti-aliased borders in some releases)
become :data:`IGNORE_INDEX` and are counted.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from rsiseg.data.coco_index import DataError
from rsiseg.data.converters.common import require_source_dir, write_outputs

POTSDAM_CLASSES = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
POTSDAM_PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
IGNORE_INDEX = 255
LABEL_SUFFIXES = {".tif", ".tiff", ".png"}

_CODES = np.array([(r << 16) | (g << 8) | b for r, g, b in POTSDAM_PALETTE], dtype=np.int64)
_ORDER = np.argsort(_CODES)
_SORTED = _CODES[_ORDER]


def rgb_to_index(label_rgb: np.ndarray) -> np.ndarray:
    """Map a ``uint8[H, W, 3]`` RGB label to ``uint8[H, W]`` class indices; other colours give 255."""
    if label_rgb.ndim != 3 or label_rgb.shape[2] < 3:
        raise ValueError(f"expected an RGB label of shape [H, W, 3], got {label_rgb.shape}")
    rgb = label_rgb[..., :3].astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    pos = np.clip(np.searchsorted(_SORTED, codes), 0, len(_SORTED) - 1)
    return np.where(_SORTED[pos] == codes, _ORDER[pos], IGNORE_INDEX).astype(np.uint8)


def index_to_rgb(index: np.ndarray, palette: Sequence[Sequence[int]] = POTSDAM_PALETTE,
                 ignore_colour: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """Map ``uint8[H, W]`` class indices to a ``uint8[H, W, 3]`` RGB label; indices past the palette
    (undefined, ignore) get ``ignore_colour``. The inverse of :func:`rgb_to_index` for the Potsdam palette."""
    table = np.tile(np.array(ignore_colour, dtype=np.uint8), (256, 1))
    table[: min(len(palette), 255)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:255]
    index = np.asarray(index)
    return table[np.where((index >= 0) & (index < 255), index, 255)]


def read_rgb(path: Path) -> np.ndarray:
    """Read a label tile as ``uint8[H, W, 3]`` RGB; unreadable or non-RGB files raise :class:`DataError`."""
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None or data.ndim != 3 or data.shape[2] < 3 or data.dtype != np.uint8:
        raise DataError(f"{path}: not a readable 8-bit RGB label tile")
    return cv2.cvtColor(data[..., :3], cv2.COLOR_BGR2RGB)


def convert_potsdam(src: str | Path, out: str | Path) -> dict[str, Any]:
    """Convert every Potsdam RGB label tile under ``src`` to an index mask in ``out/masks``.

    Returns:
        ``{"masks": n, "pixels": {class_name: count}, "undefined": count}``.

    Raises:
        DataError: no label tile found, or one that is not 8-bit RGB; nothing is left in ``out`` then.
    """
    src, out = Path(src), Path(out)
    require_source_dir(src, "ISPRS Potsdam RGB label tiles (*label*.tif or *label*.png, any depth)")
    paths = sorted(p for p in src.rglob("*label*") if p.is_file() and p.suffix.lower() in LABEL_SUFFIXES)
    if not paths:
        raise DataError(f"{src}: no Potsdam label tiles found (looked for *label*.tif|png)")
    stems = [p.stem for p in paths]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise DataError(f"{src}: label tiles share a stem, so their masks would overwrite each other: {clashes[:3]}")
    created = not out.exists()
    staging = out / ".masks.partial"  # masks move to out/masks only once every tile converted
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        totals = _write_masks(paths, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    (out / "masks").mkdir(exist_ok=True)
    for mask in sorted(staging.iterdir()):
        os.replace(mask, out / "masks" / mask.name)
    staging.rmdir()
    classes = {"names": list(POTSDAM_CLASSES), "palette": [list(c) for c in POTSDAM_PALETTE],
               "ignore_index": IGNORE_INDEX}
    write_outputs(out, {"classes.json": classes})
    return {"masks": len(paths), "pixels": {name: int(totals[i]) for i, name in enumerate(POTSDAM_CLASSES)},
            "undefined": int(totals[IGNORE_INDEX])}


def _write_masks(paths: list[Path], folder: Path) -> np.ndarray:
    """Write ``folder/<stem>.png`` for every label tile; returns the pixel count per index (``int64[256]``)."""
    totals = np.zeros(256, dtype=np.int64)
    for path in paths:
        index = rgb_to_index(read_rgb(path))
        totals += np.bincount(index.ravel(), minlength=256)
        if not cv2.imwrite(str(folder / f"{path.stem}.png"), index):
            raise DataError(f"{folder / (path.stem + '.png')}: could not be written")
    return totals
