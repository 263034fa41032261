"""Cut large image tiles and their label maps into patches, split by tile into train and val.

The point-supervised report trains on 300 x 300 patches of the ISPRS Potsdam tiles (6000 x 6000
``top_potsdam_2_10_RGB.tif`` with ``top_potsdam_2_10_label.tif``). :func:`split_semantic` pairs the
images and labels by name (:func:`~rsiseg.data.semantic.pair_files`), cuts every pair with the window
arithmetic of ``rsiseg data split`` (:func:`~rsiseg.data.tiling.patch_windows`: the last patch of a row
or column ends flush with the border) and writes::

    OUT/{train,val}/images/Image_<key>_<y>_<x>.tif   # every band (interleaved) and the stored dtype
    OUT/{train,val}/labels/Label_<key>_<y>_<x>.png   # in the labels' format: ISPRS RGB colours or uint8 indices
    OUT/classes.json                                 # the Potsdam classes, or the labels folder's classes.json
    OUT/split.json                                   # the tiles of each split, the patch counts and the options

``<key>`` is the pair's shared name and ``<y>_<x>`` the patch's top-left pixel in its tile. Labels are
read and checked as training reads them (:func:`~rsiseg.data.semantic.read_label`, ``label_format``
``potsdam_rgb`` or ``index``). Whole tiles go to one split (patches of one tile are neighbours;
splitting them would leak), drawn with a seeded shuffle or named. Everything is written into a staging
folder first: nothing is left in ``OUT`` when a pair fails.
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

from rsiseg.config import LABEL_FORMATS
from rsiseg.data.coco_index import DataError
from rsiseg.data.converters.potsdam import POTSDAM_CLASSES, POTSDAM_PALETTE, index_to_rgb
from rsiseg.data.io import ImageReadError, read_image
from rsiseg.data.semantic import list_images, pair_files, pair_key, read_label
from rsiseg.data.tiling import patch_windows

SPLITS = ("train", "val")


def split_semantic(images: str | Path, labels: str | Path, out: str | Path, size: int = 300, overlap: int = 0,
                   label_format: str = "index", val_fraction: float = 0.2, val_tiles: Sequence[str] | None = None,
                   seed: int = 0, skip_unlabelled: bool = False, progress: bool = True) -> dict[str, Any]:
    """Cut every image/label pair into ``size`` px patches and write the two splits (see the module docstring).

    Args:
        images, labels: folders of the tiles and of their label maps (paired by name).
        out: the output folder; its ``train``/``val`` folders must not exist yet.
        size, overlap: patch side and the pixels neighbouring patches share.
        label_format: ``potsdam_rgb`` (the ISPRS colours) or ``index`` (single-band class indices).
        val_fraction: share of the tiles that go to val (rounded, at least 1 and at most all but one when
            above 0), by a ``numpy`` shuffle with ``seed`` of the tiles sorted by key.
        val_tiles: the val tiles by name instead (``top_potsdam_2_13`` or a file name of the tile).
        skip_unlabelled: leave out (and count) the images without a label map, instead of refusing them.

    Returns:
        The ``split.json`` summary: per split its tiles and patch count, and the options.

    Raises:
        DataError: a missing folder, unpaired files, an unknown ``val_tiles`` name, a split left empty, a label
            whose size differs from its image's or that is not a label map of ``label_format``, an unreadable
            file (each named); ``out`` already holding splits.
        ValueError: a bad size, overlap, fraction or label format.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"--label-format must be one of {LABEL_FORMATS}, got {label_format!r}")
    patch_windows(size, size, size, overlap)  # checks size and overlap
    image_files, _ = list_images(Path(images))
    label_files, _ = list_images(Path(labels))
    labelled = {pair_key(p.name) for p in label_files}
    unlabelled = [p for p in image_files if pair_key(p.name) not in labelled] if skip_unlabelled else []
    image_files = [p for p in image_files if p not in unlabelled]
    if not image_files:
        raise DataError(f"{images}: no labelled image files")
    pairs = sorted(zip(image_files, pair_files(image_files, label_files)), key=lambda p: pair_key(p[0].name))
    val = _val_keys([pair_key(image.name) for image, _ in pairs], val_fraction, val_tiles, seed)
    out = Path(out)
    taken = [out / s for s in SPLITS if (out / s).exists()]
    if taken:
        raise DataError(f"{taken[0]} exists: remove it or choose another --out")
    summary: dict[str, Any] = {"size": size, "overlap": overlap, "label_format": label_format,
                               "val_fraction": None if val_tiles else val_fraction, "seed": seed,
                               "unlabelled_skipped": [p.name for p in unlabelled],
                               **{s: {"tiles": [], "patches": 0} for s in SPLITS}}
    created = not out.exists()
    staging = out / ".split.partial"
    shutil.rmtree(staging, ignore_errors=True)
    moved: list[Path] = []
    try:
        for s in SPLITS:
            (staging / s / "images").mkdir(parents=True)
            (staging / s / "labels").mkdir(parents=True)
        for image, label in tqdm(pairs, desc="tiles", unit="tile", disable=not progress):
            key = pair_key(image.name)
            split = "val" if key in val else "train"
            summary[split]["tiles"].append(key)
            summary[split]["patches"] += _cut_pair(image, label, key, staging / split, size, overlap, label_format)
        _write_classes(staging / "classes.json", Path(labels), label_format)
        (staging / "split.json").write_text(json.dumps(summary, indent=1))
        for name in (*SPLITS, "classes.json", "split.json"):
            if (staging / name).exists():
                os.replace(staging / name, out / name)
                moved.append(out / name)
    except BaseException:
        for path in moved:  # a failed move leaves no half output behind either
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return summary


def _val_keys(keys: list[str], fraction: float, named: Sequence[str] | None, seed: int) -> set[str]:
    """The pair keys of the val tiles: the named ones (checked), or a seeded share; never every tile."""
    if named:
        wanted = {pair_key(name) for name in named}
        unknown = sorted(wanted - set(keys))
        if unknown:
            raise DataError(f"--val-tiles {', '.join(unknown)}: no such tile; the tiles are {', '.join(keys)}")
        if wanted == set(keys):
            raise DataError("--val-tiles names every tile: nothing would be left to train on")
        return wanted
    if fraction > 0 and len(keys) < 2:
        raise DataError(f"--val-fraction {fraction} needs at least 2 tiles (one for each split); there is "
                        f"{len(keys)}: pass --val-fraction 0")
    count = min(len(keys) - 1, max(1, math.floor(fraction * len(keys) + 0.5))) if fraction > 0 else 0
    order = np.random.default_rng(seed).permutation(len(keys))
    return {keys[i] for i in order[:count]}


def _cut_pair(image_path: Path, label_path: Path, key: str, folder: Path, size: int, overlap: int,
              label_format: str) -> int:
    """Write the patches of one pair into ``folder/{images,labels}``; returns their number."""
    try:
        image = read_image(image_path)
    except ImageReadError as err:
        raise DataError(str(err)) from None
    label = read_label(label_path, label_format)  # uint8 [H, W] class indices, checked
    if image.shape[:2] != label.shape:
        raise DataError(f"{label_path}: {label.shape[1]} x {label.shape[0]} px, but its image {image_path.name} is "
                        f"{image.shape[1]} x {image.shape[0]} px")
    windows = patch_windows(image.shape[0], image.shape[1], size, overlap)
    for y1, y2, x1, x2 in windows:
        stem = f"{key}_{y1}_{x1}"
        _write_tiff(folder / "images" / f"Image_{stem}.tif", image[y1:y2, x1:x2])
        index = label[y1:y2, x1:x2]
        # RGB labels go back to their colours (undefined and stray colours as black, which reads back as undefined)
        data = cv2.cvtColor(index_to_rgb(index), cv2.COLOR_RGB2BGR) if label_format == "potsdam_rgb" else index
        if not cv2.imwrite(str(folder / "labels" / f"Label_{stem}.png"), np.ascontiguousarray(data)):
            raise DataError(f"{folder / 'labels' / f'Label_{stem}.png'}: could not be written")
    return len(windows)


def _write_tiff(path: Path, patch: np.ndarray) -> None:
    """An ``[h, w, C]`` patch as one TIFF page, bands interleaved (RGB for 3), readable by GDAL and Pillow."""
    bands = patch.shape[2]
    if bands == 1:
        tifffile.imwrite(path, np.ascontiguousarray(patch[..., 0]), photometric="minisblack")
    else:
        tifffile.imwrite(path, np.ascontiguousarray(patch), photometric="rgb" if bands == 3 else "minisblack",
                         planarconfig="contig")


def _write_classes(path: Path, labels: Path, label_format: str) -> None:
    """``classes.json`` of the patches: the Potsdam classes for RGB labels, else the labels folder's, if any."""
    if label_format == "potsdam_rgb":
        path.write_text(json.dumps({"names": list(POTSDAM_CLASSES), "palette": [list(c) for c in POTSDAM_PALETTE],
                                    "ignore_index": 255}))
    elif (labels / "classes.json").is_file():
        shutil.copyfile(labels / "classes.json", path)
