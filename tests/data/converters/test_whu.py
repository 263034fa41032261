"""WHU building converter: 8-connected components, exact RLE with holes, dropped and missing counts."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from rsiseg.data.converters.whu import convert_whu
from rsiseg.structures import segmentation_to_mask


def write(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), data)


def label_a() -> np.ndarray:
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[2:12, 2:12] = 255
    mask[5:9, 5:9] = 0                     # ring with a hole: one instance
    mask[20, 20] = mask[21, 21] = 255      # diagonal pair: one instance under 8-connectivity, area 2 (dropped)
    mask[15:20, 25:31] = 255               # 5 x 6 block, area 30
    return mask


def make_source(root: Path) -> Path:
    image = np.full((32, 32, 3), 90, dtype=np.uint8)
    write(root / "train" / "image" / "a.tif", image)
    write(root / "train" / "label" / "a.tif", label_a())
    write(root / "train" / "image" / "b.tif", image)                       # no label: kept, counted
    write(root / "val" / "image" / "c.png", image)
    ones = np.zeros((32, 32), dtype=np.uint8)
    ones[0:4, 0:4] = 1                                                      # 1 also means building
    write(root / "val" / "label" / "c.png", ones)
    return root


def test_components_rle_and_counts(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src")
    summary = convert_whu(src, tmp_path / "out", min_area=10)
    assert summary == {"train": {"images": 2, "instances": 2, "dropped_small": 1, "missing_labels": 1},
                       "val": {"images": 1, "instances": 1, "dropped_small": 0, "missing_labels": 0}}
    coco = json.loads((tmp_path / "out" / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["building"]
    assert [i["file_name"] for i in coco["images"]] == ["train/image/a.tif", "train/image/b.tif"]
    ring, block = sorted(coco["annotations"], key=lambda a: a["bbox"][0])
    assert ring["bbox"] == [2.0, 2.0, 10.0, 10.0] and ring["area"] == 100.0 - 16.0
    assert block["bbox"] == [25.0, 15.0, 6.0, 5.0] and block["area"] == 30.0
    expected = np.zeros((32, 32), dtype=np.uint8)
    expected[2:12, 2:12] = 1
    expected[5:9, 5:9] = 0
    np.testing.assert_array_equal(segmentation_to_mask(ring["segmentation"], 32, 32), expected)
    assert {a["image_id"] for a in coco["annotations"]} == {1}
    assert len({a["id"] for a in coco["annotations"]}) == 2
    val = json.loads((tmp_path / "out" / "annotations" / "instances_val.json").read_text())
    assert val["annotations"][0]["area"] == 16.0


def test_min_area_zero_keeps_everything(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src")
    summary = convert_whu(src, tmp_path / "out", min_area=0)
    assert summary["train"]["instances"] == 3 and summary["train"]["dropped_small"] == 0


def test_size_mismatch_names_the_file(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src")
    write(src / "val" / "label" / "c.png", np.zeros((16, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="c.png"):
        convert_whu(src, tmp_path / "out")


def test_no_split_raises(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no splits here")
    with pytest.raises(ValueError, match="no WHU split"):
        convert_whu(tmp_path, tmp_path / "out")
