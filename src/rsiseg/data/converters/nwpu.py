"""NWPU VHR-10 (10 classes, 650 positive images) to COCO train/val files with a seeded 7:3 split.

Layout read: every COCO JSON in ``SRC/annotations`` (else ``SRC``), merged (see
:mod:`rsiseg.data.converters.common`), or only the files given as ``ann``. The public COCO
conversion ships one file for all 650 images. Written: ``OUT/annotations/nwpu_instances_{train,val}.json``
with ``file_name`` as in the source JSON. The split is a pure function of the seed and the image
file names, so the same seed always gives the same split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rsiseg.data.converters.common import (
    SourceReport,
    read_sources,
    require_images,
    source_files,
    subset,
    write_splits,
)


def split_names(names: list[str], train_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Deterministic ``(train, val)`` split of image names; ``round(train_fraction * n)`` go to train."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    order = sorted(names)
    np.random.default_rng(seed).shuffle(order)
    cut = round(train_fraction * len(order))
    return set(order[:cut]), set(order[cut:])


def convert_nwpu(src: str | Path, out: str | Path, train_fraction: float = 0.7, seed: int = 0, *,
                 ann: Sequence[str | Path] | None = None, skip_invalid: bool = False) -> dict[str, Any]:
    """Write the seeded train/val split of NWPU VHR-10.

    Args:
        src: folder holding the COCO JSON(s).
        out: output folder.
        train_fraction: share of images in train.
        seed: seed of the split.
        ann: read only these COCO files instead of every JSON under ``src``.
        skip_invalid: drop and count annotations with non-finite or absurd numbers instead of refusing.

    Returns:
        ``{split: {"images": n, "instances": n}, "read": {file: counts}, "skipped": {...}, ...}``.

    Raises:
        DataError: no source, no image, conflicting files or a bad annotation (naming the file).
    """
    src, out = Path(src), Path(out)
    report = SourceReport()
    coco = read_sources(source_files(src, ann, "*.json", "NWPU VHR-10 COCO JSON"), report, skip_invalid=skip_invalid)
    require_images(len(coco["images"]), src, "the COCO JSON lists no image")
    train, val = split_names([img["file_name"] for img in coco["images"]], train_fraction, seed)
    splits = {"train": subset(coco, train), "val": subset(coco, val)}
    return write_splits(out, "nwpu_instances_{split}.json", splits, report)
