"""YOLO-seg converter: polygons, box-only lines, counted problems, string-sorted numeric names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from rsiseg.data.converters.yolo import categories_for, convert_yolo


def make_layout(root: Path, names: list[str], lines: list[str]) -> None:
    for sub in ("images/train", "labels/train", "images/val"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(root / "images/train/a.png")
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(root / "images/val/b.png")  # no label file
    (root / "labels/train/a.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: {json.dumps(names)}\n")


def test_polygons_boxes_and_problems(tmp_path: Path) -> None:
    make_layout(tmp_path, ["car", "ship"], [
        "0 0.1 0.2 0.3 0.2 0.3 0.6",  # triangle
        "1 0.5 0.5 0.2 0.4",  # box-only
        "1 0.1 0.1 0.2 0.2 0.3",  # odd number of coordinates
        "5 0.1 0.1 0.2 0.2 0.3 0.3",  # unknown class
    ])
    summary = convert_yolo(tmp_path, tmp_path / "out")
    assert summary["splits"] == {"train": {"images": 1, "instances": 2}, "val": {"images": 1, "instances": 0}}
    assert summary["problems"] == {"box-only label (kept as rectangle)": 1,
                                   "polygon with < 3 points or odd coordinates (skipped)": 1,
                                   "unknown class index (skipped)": 1,
                                   "image without label file (kept, no instances)": 1}
    assert "a.txt:4" in summary["problem_examples"]["unknown class index (skipped)"][0]
    coco = json.loads((tmp_path / "out/annotations/instances_train.json").read_text())
    tri, box = coco["annotations"]
    assert tri["segmentation"] == [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0]] and tri["area"] == 200.0
    assert box["bbox"] == [40.0, 15.0, 20.0, 20.0] and box["category_id"] == 2
    assert coco["images"][0]["file_name"] == "images/train/a.png"


def test_numeric_names_sorted_as_strings_map_by_name() -> None:
    names = ["0", "1", "10", "11", "2", "3", "4", "5", "6", "7", "8", "9"]
    categories, label_to_cat = categories_for(names)
    assert [c["name"] for c in categories] == [str(i) for i in range(12)]
    by_id = {c["id"]: c["name"] for c in categories}
    assert [by_id[label_to_cat[i]] for i in range(12)] == names  # index 2 is class "10", not "2"
    _, plain = categories_for(["plane", "ship"])
    assert plain == {0: 1, 1: 2}
