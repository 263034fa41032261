"""SSDD (SAR ship detection dataset) to COCO with the official split and inshore/offshore subsets.

The official split puts every image whose file number ends in 1 or 9 in the test set
(232 of 1160 images). The inshore/offshore partition of the test set cannot be derived
from the images: it comes from the release's inshore list, given as a COCO JSON or a text
file of image names; offshore is the rest of the test set.

Layout read: every COCO JSON in ``SRC/annotations`` (else ``SRC``), merged (the release's
``*all*``, ``*train*`` and ``*test*`` files hold the same images; see
:mod:`rsiseg.data.converters.common`), or only the files given as ``ann``; the inshore list is a
``*inshore*.json`` among them or ``inshore``. Written: ``OUT/annotations/ssdd_instances_{train,
test,test_inshore,test_offshore}.json`` with ``file_name`` as in the source (relative to the SSDD
image folder). Images are not copied; pass the SSDD image folder when training.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rsiseg.data.coco_index import DataError, read_coco_json
from rsiseg.data.converters.common import (
    SourceReport,
    read_sources,
    require_images,
    source_files,
    subset,
    write_splits,
)

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
        images = read_coco_json(path)["images"]
        bad = [i for i, img in enumerate(images) if not isinstance(img, dict) or not isinstance(img.get("file_name"), str)]
        if bad:
            raise DataError(f"{path}: images[{bad[0]}] has no string 'file_name' ({len(bad)} such entries)")
        return {img["file_name"] for img in images}
    try:
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: the inshore list is not UTF-8 text: {err}") from None


def convert_ssdd(src: str | Path, out: str | Path, inshore: str | Path | None = None, *,
                 ann: Sequence[str | Path] | None = None, skip_invalid: bool = False) -> dict[str, Any]:
    """Write the official train/test split (and inshore/offshore test subsets) of SSDD.

    Args:
        src: folder holding the COCO JSON(s).
        out: output folder.
        inshore: inshore test images (COCO JSON or a text file of names); default: a
            ``*inshore*.json`` among the sources.
        ann: read only these COCO files instead of every JSON under ``src``.
        skip_invalid: drop and count annotations with non-finite or absurd numbers instead of refusing.

    Returns:
        ``{split: {"images": n, "instances": n}}`` for every file written, plus ``read`` and ``skipped``.

    Raises:
        DataError: no source JSON, a malformed or conflicting one, no image, a bad annotation, or
            an inshore image outside the test set.
    """
    src, out = Path(src), Path(out)
    report = SourceReport()
    paths = source_files(src, ann, "*.json", "SSDD COCO JSON")
    coco = read_sources(paths, report, skip_invalid=skip_invalid)
    require_images(len(coco["images"]), src, "the COCO JSON lists no image")
    test = {img["file_name"] for img in coco["images"] if is_official_test(img["file_name"])}
    splits = {"train": subset(coco, {img["file_name"] for img in coco["images"]} - test), "test": subset(coco, test)}
    inshore_path = Path(inshore) if inshore else _inshore_file(paths)
    if inshore_path is not None:
        names = read_name_list(inshore_path)
        outside = sorted(names - test)
        if outside:
            raise DataError(f"{inshore_path}: {len(outside)} inshore images are not in the official test set, "
                            f"e.g. {outside[:3]}")
        splits["test_inshore"] = subset(coco, names)
        splits["test_offshore"] = subset(coco, test - names)
    return write_splits(out, "ssdd_instances_{split}.json", splits, report)


def _inshore_file(paths: list[Path]) -> Path | None:
    """The one ``*inshore*`` file among the sources; several are ambiguous."""
    found = [p for p in paths if "inshore" in p.name.lower()]
    if len(found) > 1:
        raise DataError(f"{found[0].parent}: several inshore files {[p.name for p in found]}; pass --inshore FILE")
    return found[0] if found else None
