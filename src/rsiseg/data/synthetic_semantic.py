"""Deterministic synthetic aerial scenes with dense Potsdam-like labels, for semantic segmentation tests.

Six classes in the ISPRS Potsdam order and palette: roads are impervious surfaces, rotated
rectangles with shaded roofs are buildings, the textured ground and crop fields are low
vegetation, round crowns are trees, small boxes on the road are cars, and patches of bare soil
or debris are clutter. Classes share colours in part (grey roofs and roads, green fields and
trees) so that a model has to use shape and texture, not colour alone.

Scene ``k`` of seed ``s`` depends only on ``(s, k)``, never on the number of scenes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from rsiseg.data.converters.common import write_outputs
from rsiseg.data.converters.potsdam import IGNORE_INDEX, POTSDAM_CLASSES, POTSDAM_PALETTE
from rsiseg.data.synthetic import split_indices
from rsiseg.data.synthetic_shapes import (
    blob,
    chamfered_rect,
    fill_mask,
    fractal_noise,
    paint_fields,
    paint_ground,
    paint_road,
    rect,
    road_mask,
    to_image,
)

IMPERVIOUS, BUILDING, LOW_VEGETATION, TREE, CAR, CLUTTER = range(6)
ROOFS = ((0.62, 0.30, 0.22), (0.45, 0.44, 0.43), (0.28, 0.27, 0.29), (0.70, 0.66, 0.60))
CAR_COLOURS = ((0.85, 0.85, 0.86), (0.10, 0.10, 0.12), (0.55, 0.08, 0.08), (0.15, 0.22, 0.50), (0.50, 0.50, 0.52))
_SCENE_STREAM = 7  # SeedSequence spawn key of the scenes (the split uses rsiseg.data.synthetic's stream)


def generate_semantic_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: uint8 ``[size, size, 3]`` RGB image and uint8 ``[size, size]`` class indices (0..5)."""
    canvas, lum = paint_ground(rng, size)
    labels = np.full((size, size), LOW_VEGETATION, np.uint8)
    paint_fields(rng, canvas, lum, area=(size / 256) ** 2)
    _clutter(rng, canvas, labels, lum)
    line, _, width = paint_road(rng, canvas, lum)
    road = cv2.dilate(road_mask(size, line, width + 3), np.ones((3, 3), np.uint8)).astype(bool)
    labels[road] = IMPERVIOUS
    _buildings(rng, canvas, labels, lum, road)
    _cars(rng, canvas, labels, line, width)
    _trees(rng, canvas, labels, lum)
    canvas += rng.normal(0.0, 0.015, canvas.shape).astype(np.float32)  # sensor noise
    return (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8), labels


def _polygon_mask(size: int, poly: np.ndarray) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    fill_mask(mask, poly)
    return mask.astype(bool)


def _clutter(rng: np.random.Generator, canvas: np.ndarray, labels: np.ndarray, lum: np.ndarray) -> None:
    """Bare-soil patches and debris heaps: brownish-grey, coarse grain."""
    size = labels.shape[0]
    grain = fractal_noise(rng, size, 4, 2)
    for _ in range(rng.integers(1, 4)):
        poly = to_image(blob(rng, rng.uniform(0.05, 0.12) * size, n=11, jitter=0.4), *rng.uniform(0, size, 2), 0.0)
        m = _polygon_mask(size, poly)
        colour = np.float32(rng.uniform((0.45, 0.38, 0.30), (0.62, 0.55, 0.48)))
        canvas[m] = colour * (lum[m] + 0.12 * grain[m])[:, None]
        labels[m] = CLUTTER


def _buildings(rng: np.random.Generator, canvas: np.ndarray, labels: np.ndarray, lum: np.ndarray,
               road: np.ndarray) -> None:
    """Rotated rectangular houses off the road; gable roofs with a lit and a shaded half, and a shadow."""
    size = labels.shape[0]
    for _ in range(rng.integers(1, 5)):
        length, width = rng.uniform(0.12, 0.3, 2) * size
        cx, cy, angle = *rng.uniform(0.1, 0.9, 2) * size, rng.uniform(0, np.pi)
        footprint = _polygon_mask(size, to_image(rect(-length / 2, length / 2, -width / 2, width / 2), cx, cy, angle))
        if (footprint & road).mean() > 0.02 * footprint.mean():
            continue  # houses stand beside roads, not on them
        shadow = np.roll(footprint, (max(1, size // 60), max(1, size // 60)), axis=(0, 1)) & ~footprint
        canvas[shadow] *= 0.55
        half = _polygon_mask(size, to_image(rect(-length / 2, length / 2, 0, width / 2), cx, cy, angle))
        roof = np.float32(ROOFS[rng.integers(len(ROOFS))])
        canvas[footprint] = roof * (0.8 + 0.2 * lum[footprint])[:, None]
        canvas[half & footprint] *= 0.75
        labels[footprint] = BUILDING


def _cars(rng: np.random.Generator, canvas: np.ndarray, labels: np.ndarray, line: np.ndarray, width: int) -> None:
    """Cars along the road, in lanes either side of the centre line."""
    size = labels.shape[0]
    inside = np.flatnonzero((line >= 2).all(axis=1) & (line < size - 2).all(axis=1))
    if inside.size < 2:
        return
    length = max(4.0, 0.045 * size)
    for k in rng.choice(inside, min(inside.size, int(rng.integers(1, 6))), replace=False):
        tangent = line[min(k + 1, len(line) - 1)] - line[max(k - 1, 0)]
        angle = float(np.arctan2(tangent[1], tangent[0]))
        offset = rng.choice([-1, 1]) * width / 4 * np.array([-np.sin(angle), np.cos(angle)])
        poly = to_image(chamfered_rect(length, length / 2.1, length / 8), *(line[k] + offset), angle)
        m = _polygon_mask(size, poly)
        canvas[m] = np.float32(CAR_COLOURS[rng.integers(len(CAR_COLOURS))])
        labels[m] = CAR


def _trees(rng: np.random.Generator, canvas: np.ndarray, labels: np.ndarray, lum: np.ndarray) -> None:
    """Round, dark, leafy crowns (fine-grained texture), some overhanging roofs and roads."""
    size = labels.shape[0]
    leaves = fractal_noise(rng, size, 2, 2)
    for _ in range(rng.integers(2, 9)):
        poly = to_image(blob(rng, rng.uniform(0.03, 0.08) * size, n=10), *rng.uniform(0, size, 2), 0.0)
        m = _polygon_mask(size, poly)
        green = np.float32(rng.uniform((0.12, 0.25, 0.08), (0.22, 0.38, 0.15)))
        canvas[m] = green * (lum[m] + 0.25 * leaves[m])[:, None]
        labels[m] = TREE


def write_synthetic_semantic_dataset(out_dir: str | Path, images: int = 24, size: int = 96, seed: int = 0,
                                     val_fraction: float = 0.25) -> dict[str, Any]:
    """Write PNG scenes and their index labels, split into train and val.

    Layout: ``out/images/{train,val}/scene_00000.png`` (RGB), ``out/labels/{train,val}/scene_00000.png``
    (uint8 class indices) and ``out/classes.json`` (names, palette, ignore index, as the Potsdam
    converter writes). The scenes are written to a staging folder first, so an error leaves no
    partial ``images``/``labels`` folders.

    Returns:
        ``{"train_images", "train_labels", "val_images", "val_labels", "classes": Path, "train": n, "val": n}``.
    """
    out = Path(out_dir)
    val = split_indices(images, val_fraction, seed)
    staging = out / ".synthetic_semantic.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for folder in (staging / k / s for k in ("images", "labels") for s in ("train", "val")):
            folder.mkdir(parents=True)
        for index in range(images):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SCENE_STREAM, index)))
            image, labels = generate_semantic_scene(rng, size)
            split = "val" if index in val else "train"
            _write_png(staging / "images" / split / f"scene_{index:05d}.png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            _write_png(staging / "labels" / split / f"scene_{index:05d}.png", labels)
        for folder in ("images", "labels"):
            shutil.rmtree(out / folder, ignore_errors=True)
            os.replace(staging / folder, out / folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    classes = {"names": list(POTSDAM_CLASSES), "palette": [list(c) for c in POTSDAM_PALETTE],
               "ignore_index": IGNORE_INDEX}
    write_outputs(out, {"classes.json": classes})
    result: dict[str, Any] = {f"{s}_{kind}": out / kind / s for s in ("train", "val") for kind in ("images", "labels")}
    return result | {"classes": out / "classes.json", "train": images - len(val), "val": len(val)}


def _write_png(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), array):
        raise OSError(f"{path}: could not be written")
