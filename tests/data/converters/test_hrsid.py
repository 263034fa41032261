"""HRSID converter: the COCO release and the PNG id-mask variant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsiseg.data.coco_index import DataError
from rsiseg.data.converters.hrsid import convert_hrsid


def test_coco_release(tmp_path: Path) -> None:
    (tmp_path / "src" / "annotations").mkdir(parents=True)
    coco = {"images": [{"id": 1, "file_name": "P0001_0_800_0_800.png", "height": 800, "width": 800}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}],
            "categories": [{"id": 1, "name": "ship"}]}
    (tmp_path / "src" / "annotations" / "train2017.json").write_text(json.dumps(coco))
    (tmp_path / "src" / "annotations" / "test2017.json").write_text(json.dumps({**coco, "annotations": []}))
    summary = convert_hrsid(tmp_path / "src", tmp_path / "out")
    assert summary["files"] == {"hrsid_instances_test2017.json": {"images": 1, "instances": 0},
                       "hrsid_instances_train2017.json": {"images": 1, "instances": 1}}
    written = json.loads((tmp_path / "out" / "annotations" / "hrsid_instances_train2017.json").read_text())
    assert written["annotations"] == coco["annotations"]


def test_nothing_to_convert(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing to convert")
    with pytest.raises(DataError, match="neither"):
        convert_hrsid(tmp_path, tmp_path / "out")


def test_png_variant(shared_data: Path, tmp_path: Path) -> None:
    summary = convert_hrsid(shared_data / "hrsid_samples", tmp_path, progress=False)
    assert summary["instances"] == 146 and summary["skipped"] == {}
