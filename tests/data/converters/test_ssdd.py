"""SSDD converter: the official split rule and the inshore/offshore subsets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsiseg.data.coco_index import DataError
from rsiseg.data.converters.ssdd import convert_ssdd, is_official_test


def test_split_rule() -> None:
    assert [is_official_test(f"{n:06d}.jpg") for n in (1, 9, 11, 19, 2, 10, 18)] == [True] * 4 + [False] * 3
    with pytest.raises(DataError, match="no number"):
        is_official_test("ship.jpg")


def test_tiny_layout(tmp_path: Path) -> None:
    images = [{"id": i, "file_name": f"{i:06d}.jpg", "height": 10, "width": 10} for i in range(1, 21)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 2, 2]} for i in range(1, 21)]
    src = tmp_path / "src" / "annotations"
    src.mkdir(parents=True)
    (src / "ssdd_instances_all.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                             "categories": [{"id": 1, "name": "ship"}]}))
    (tmp_path / "inshore.txt").write_text("000001.jpg\n000019.jpg\n")
    summary = convert_ssdd(tmp_path / "src", tmp_path / "out", inshore=tmp_path / "inshore.txt")
    assert summary["test"] == {"images": 4, "instances": 4}  # 1, 9, 11, 19
    assert summary["train"]["images"] == 16
    assert summary["test_inshore"]["images"] == 2 and summary["test_offshore"]["images"] == 2
    (tmp_path / "bad.txt").write_text("000002.jpg\n")
    with pytest.raises(DataError, match="not in the official test set"):
        convert_ssdd(tmp_path / "src", tmp_path / "out2", inshore=tmp_path / "bad.txt")


def test_reproduces_the_published_split(shared_data: Path, tmp_path: Path) -> None:
    ssdd = shared_data / "ssdd"
    summary = convert_ssdd(ssdd, tmp_path)
    assert summary["train"] == {"images": 928, "instances": 2040}
    assert summary["test"] == {"images": 232, "instances": 546}
    for split in ("train", "test", "test_inshore", "test_offshore"):
        ours = json.loads((tmp_path / "annotations" / f"ssdd_instances_{split}.json").read_text())
        theirs = json.loads((ssdd / "annotations" / f"ssdd_instances_{split}.json").read_text())
        assert sorted(i["file_name"] for i in ours["images"]) == sorted(i["file_name"] for i in theirs["images"])
        assert len(ours["annotations"]) == len(theirs["annotations"])
