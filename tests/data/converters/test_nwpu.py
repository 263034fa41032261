"""NWPU VHR-10 converter: a seeded, deterministic 7:3 split that loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsiseg.data.coco_index import DataError
from rsiseg.data.converters.nwpu import convert_nwpu


def write_source(root: Path, n: int = 20) -> Path:
    images = [{"id": i, "file_name": f"{i:03d}.jpg", "height": 10, "width": 10} for i in range(1, n + 1)]
    anns = [{"id": 10 * i + k, "image_id": i, "category_id": 1 + k, "bbox": [1, 1, 2, 2]}
            for i in range(1, n + 1) for k in range(i % 3)]
    cats = [{"id": c, "name": name} for c, name in enumerate(["airplane", "ship", "storage tank"], start=1)]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                                     "categories": cats}))
    return root


def test_seeded_split(tmp_path: Path) -> None:
    src = write_source(tmp_path / "src")
    first = convert_nwpu(src, tmp_path / "a", seed=1)
    again = convert_nwpu(src, tmp_path / "b", seed=1)
    convert_nwpu(src, tmp_path / "c", seed=2)
    assert first == again and first["train"]["images"] == 14 and first["val"]["images"] == 6
    assert first["train"]["instances"] + first["val"]["instances"] == sum(i % 3 for i in range(1, 21))
    read = lambda d, s: {i["file_name"] for i in json.loads((tmp_path / d / "annotations" / f"nwpu_instances_{s}.json").read_text())["images"]}  # noqa: E731
    assert read("a", "train") == read("b", "train") != read("c", "train")
    assert not read("a", "train") & read("a", "val")


def test_missing_and_malformed_source(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no annotations here")
    with pytest.raises(DataError, match="no NWPU VHR-10 COCO JSON"):
        convert_nwpu(tmp_path, tmp_path / "out")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(DataError, match=r"x\.json: malformed JSON"):
        convert_nwpu(tmp_path, tmp_path / "out")
