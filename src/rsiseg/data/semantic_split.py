"""Cut large image tiles and their label maps into patches, split by tile into train and val.

The point-supervised report trains on 300 x 300 patches of the ISPRS Potsdam tiles (6000 x 6000
``top_potsdam_2_10_RGB.tif`` with ``top_potsdam_2_10_label.tif``). :func:`split_semantic` pairs the
images and labels by name (:func:`~rsiseg.data.semantic.pair_files`), cuts every pair with the window
arithmetic of ``rsiseg data split`` (:func:`~rsiseg.data.tiling.patch_windows`: the last patch of a row
or column ends flush with the border) and writes::

    OUT/{train,val}/images/Image_<key>_<y>_<x>.tif   # every band and the stored dtype
    OUT/{train,val}/labels/Label_<key>_<y>_<x>.png   # the label's own values: RGB palette or class indices
    OUT/classes.json                                 # copied from the labels folder, when there is one
    OUT/split.json                                   # the tiles of each split and the patch counts

``<key>`` is the pair's shared name and ``<y>_<x>`` the patch's top-left pixel in its tile. Whole tiles
go to one split (patches of one tile are neighbours; splitting them would leak), drawn with a seeded
shuffle or named. Nothing is left in ``OUT`` when a pair fails.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

from rsiseg.data.coco_index import DataError
from rsiseg.data.io import ImageReadError, read_image
from rsiseg.data.semantic import list_images, pair_files, pair_key
from rsiseg.data.tiling import patch_windows

SPLITS = ("train", "val")


def split_semantic(images: str | Path, labels: str | Path, out: str | Path, size: int = 300, overlap: int = 0,
                   val_fraction: float = 0.2, val_tiles: Sequence[str] | None = None, seed: int = 0,
                   progress: bool = True) -> dict[str, Any]:
    """Cut every image/label pair into ``size`` px patches and write the two splits (see the module docstring).

    Args:
        images, labels: folders of the tiles and of their label maps (paired by name).
        out: the output folder; its ``train``/``val`` folders must not exist yet.
        size, overlap: patch side and the pixels neighbouring patches share.
        val_fraction: share of the tiles that go to val (rounded, at least 1 when above 0), by a
            ``numpy`` shuffle with ``seed`` of the tiles sorted by key.
        val_tiles: the pair keys of the val tiles instead (e.g. ``top_potsdam_2_13``).

    Returns:
        The ``split.json`` summary: per split its tiles and patch count, and the options.

    Raises:
        DataError: a missing folder, unpaired files, an unknown ``val_tiles`` key, a label whose size differs
            from its image's, an unreadable file (each named); ``out`` already holding splits.
        ValueError: a bad size, overlap or fraction.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    patch_windows(size, size, size, overlap)  # checks size and overlap
    image_files, _ = list_images(Path(images))
    label_files, _ = list_images(Path(labels))
    if not image_files:
        raise DataError(f"{images}: no image files")
    pairs = sorted(zip(image_files, pair_files(image_files, label_files)), key=lambda p: pair_key(p[0].name))
    val = _val_keys([pair_key(image.name) for image, _ in pairs], val_fraction, val_tiles, seed)
    out = Path(out)
    taken = [out / s for s in SPLITS if (out / s).exists()]
    if taken:
        raise DataError(f"{taken[0]} exists: remove it or choose another --out")
    staging = out / ".split.partial"
    shutil.rmtree(staging, ignore_errors=True)
    summary: dict[str, Any] = {"size": size, "overlap": overlap, "seed": seed,
                               **{s: {"tiles": [], "patches": 0} for s in SPLITS}}
    try:
        for s in SPLITS:
            (staging / s / "images").mkdir(parents=True)
            (staging / s / "labels").mkdir(parents=True)
        for image, label in tqdm(pairs, desc="tiles", unit="tile", disable=not progress):
            key = pair_key(image.name)
            split = "val" if key in val else "train"
            summary[split]["tiles"].append(key)
            summary[split]["patches"] += _cut_pair(image, label, key, staging / split, size, overlap)
        for s in SPLITS:
            os.replace(staging / s, out / s)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if (Path(labels) / "classes.json").is_file():
        shutil.copyfile(Path(labels) / "classes.json", out / "classes.json")
    (out / "split.json").write_text(json.dumps(summary, indent=1))
    return summary


def _val_keys(keys: list[str], fraction: float, named: Sequence[str] | None, seed: int) -> set[str]:
    """The pair keys of the val tiles: the named ones (checked), or a seeded share."""
    if named:
        unknown = sorted(set(named) - set(keys))
        if unknown:
            raise DataError(f"--val-tiles {', '.join(unknown)}: no such tile; the tiles are {', '.join(keys)}")
        return set(named)
    count = min(len(keys) - 1, max(1, math.floor(fraction * len(keys) + 0.5))) if fraction > 0 else 0
    order = np.random.default_rng(seed).permutation(len(keys))
    return {keys[i] for i in order[:count]}


def _cut_pair(image_path: Path, label_path: Path, key: str, folder: Path, size: int, overlap: int) -> int:
    """Write the patches of one pair into ``folder/{images,labels}``; returns their number."""
    try:
        image, label = read_image(image_path), read_image(label_path)
    except ImageReadError as err:
        raise DataError(str(err)) from None
    if image.shape[:2] != label.shape[:2]:
        raise DataError(f"{label_path}: {label.shape[1]} x {label.shape[0]} px, but its image {image_path.name} is "
                        f"{image.shape[1]} x {image.shape[0]} px")
    windows = patch_windows(image.shape[0], image.shape[1], size, overlap)
    for y1, y2, x1, x2 in windows:
        stem = f"{key}_{y1}_{x1}"
        patch = image[y1:y2, x1:x2]
        tifffile.imwrite(folder / "images" / f"Image_{stem}.tif", patch,
                         photometric="rgb" if patch.shape[2] == 3 else "minisblack")
        _write_label(folder / "labels" / f"Label_{stem}.png", label[y1:y2, x1:x2])
    return len(windows)


def _write_label(path: Path, label: np.ndarray) -> None:
    """A label patch ``[h, w, 1 | 3]`` as a lossless PNG (RGB kept as RGB, one band as grey)."""
    data = label[..., 0] if label.shape[2] == 1 else cv2.cvtColor(np.ascontiguousarray(label[..., :3]),
                                                                   cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), np.ascontiguousarray(data)):
        raise DataError(f"{path}: could not be written")
