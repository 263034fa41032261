"""SSDD (SAR ship detection dataset) to COCO with the official split and inshore/offshore subsets.

The official split puts every image whose file number ends in 1 or 9 in the test set
(232 of 1160 images). The inshore/offshore partition of the test set cannot be derived
from the images: it comes from the release's inshore list, given as a COCO JSON or a text
file of image names; offshore is the rest of the test set.

Layout read: ``SRC/annotations/*all*.json`` (or the only JSON in ``SRC/annotations`` or ``SRC``)
and optionally a ``*inshore*.json`` beside it. Written: ``OUT/annotations/ssdd_instances_{train,
test,test_inshore,test_offshore}.json``. Images are not copied; pass the SSDD image folder
when training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rsiseg.data.coco_index import DataError, read_coco_json
from rsiseg.data.converters.common import find_source_json, subset

TEST_DIGITS = {"1", "9"}


def is_official_test(file_name: str) -> bool:
    """True when the image number (the last digits of the stem) ends in 1 or 9.

    Raises:
        DataError: the name holds no number.
    """
    match = re.search(r"(\d+)$", Path(file_name).stem)
    if match is None:
        raise DataError(f"SSDD image {file_name!r} has no number in its name; the official split needs one")
    return match.group(1)[-1] in TEST_DIGITS


def read_name_list(path: Path) -> set[str]:
    """Image names from a COCO JSON's images or a text file with one name per line."""
    if path.suffix.lower() == ".json":
        return {img["file_name"] for img in json.loads(path.read_text())["images"]}
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def convert_ssdd(src: str | Path, out: str | Path, inshore: str | Path | None = None) -> dict[str, Any]:
    """Write the official train/test split (and inshore/offshore test subsets) of SSDD.

    Returns:
        ``{split: {"images": n, "instances": n}}`` for every file written.

    Raises:
        DataError: no source JSON, a malformed one, or an inshore image outside the test set.
    """
    src, out = Path(src), Path(out)
    all_json = find_source_json(src, "*all*.json") or find_source_json(src, "*.json")
    if all_json is None:
        raise DataError(f"{src}: no SSDD COCO JSON found (looked for annotations/*all*.json and *.json)")
    coco = read_coco_json(all_json)
    test = {img["file_name"] for img in coco["images"] if is_official_test(img["file_name"])}
    splits = {"train": subset(coco, {img["file_name"] for img in coco["images"]} - test), "test": subset(coco, test)}
    inshore_path = Path(inshore) if inshore else find_source_json(src, "*inshore*.json")
    if inshore_path is not None:
        names = read_name_list(inshore_path)
        outside = sorted(names - test)
        if outside:
            raise DataError(f"{inshore_path}: {len(outside)} inshore images are not in the official test set, "
                            f"e.g. {outside[:3]}")
        splits["test_inshore"] = subset(coco, names)
        splits["test_offshore"] = subset(coco, test - names)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, data in splits.items():
        (out / "annotations" / f"ssdd_instances_{name}.json").write_text(json.dumps(data))
        summary[name] = {"images": len(data["images"]), "instances": len(data["annotations"])}
    return summary
