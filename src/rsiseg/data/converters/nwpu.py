"""NWPU VHR-10 (10 classes, 650 positive images) to COCO train/val files with a seeded 7:3 split.

Layout read: the positive image set and its COCO JSON, found as ``SRC/annotations/*.json`` or
``SRC/*.json`` (the public COCO conversion ships one file for all 650 images). Written:
``OUT/annotations/nwpu_instances_{train,val}.json``. The split is a pure function of the seed
and the image file names, so the same seed always gives the same split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rsiseg.data.coco_index import DataError, read_coco_json
from rsiseg.data.converters.common import find_source_json, subset


def split_names(names: list[str], train_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Deterministic ``(train, val)`` split of image names; ``round(train_fraction * n)`` go to train."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    order = sorted(names)
    np.random.default_rng(seed).shuffle(order)
    cut = round(train_fraction * len(order))
    return set(order[:cut]), set(order[cut:])


def convert_nwpu(src: str | Path, out: str | Path, train_fraction: float = 0.7, seed: int = 0) -> dict[str, Any]:
    """Write the seeded train/val split of NWPU VHR-10.

    Returns:
        ``{split: {"images": n, "instances": n}}``.
    """
    src, out = Path(src), Path(out)
    source = find_source_json(src, "*.json")
    if source is None:
        raise DataError(f"{src}: no NWPU VHR-10 COCO JSON found (looked for annotations/*.json and *.json)")
    coco = read_coco_json(source)
    train, val = split_names([img["file_name"] for img in coco["images"]], train_fraction, seed)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, names in (("train", train), ("val", val)):
        data = subset(coco, names)
        (out / "annotations" / f"nwpu_instances_{name}.json").write_text(json.dumps(data))
        summary[name] = {"images": len(data["images"]), "instances": len(data["annotations"])}
    return summary
