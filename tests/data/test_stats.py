"""``rsiseg data stats``: exact counts, size ranges and foreground-ratio bins on a hand-made dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from rsiseg.commands import data_stats
from rsiseg.data.coco_index import DataError
from rsiseg.data.stats import dataset_stats, foreground_bins
from rsiseg.structures import mask_to_rle


def _rle(h: int, w: int, rows: slice, cols: slice) -> dict:
    mask = np.zeros((h, w), np.uint8)
    mask[rows, cols] = 1
    return mask_to_rle(mask)


def write_dataset(root: Path) -> Path:
    """Four images with foreground ratios 0.46, 0.125, 0.5625 and 0 (exact, from RLE masks)."""
    images = [{"id": 1, "file_name": "a.png", "height": 10, "width": 10},
              {"id": 2, "file_name": "b.png", "height": 10, "width": 20},
              {"id": 3, "file_name": "c.png", "height": 200, "width": 200},
              {"id": 4, "file_name": "d.png", "height": 10, "width": 10}]
    anns = [
        # image 1: two overlapping 5x5 squares, union 25 + 25 - 4 = 46 of 100 px
        {"image_id": 1, "category_id": 1, "segmentation": _rle(10, 10, slice(0, 5), slice(0, 5)), "bbox": [0, 0, 5, 5]},
        {"image_id": 1, "category_id": 1, "segmentation": _rle(10, 10, slice(3, 8), slice(3, 8)), "bbox": [3, 3, 5, 5]},
        # image 2: 15 + 10 disjoint px of 200
        {"image_id": 2, "category_id": 2, "segmentation": _rle(10, 20, slice(0, 3), slice(0, 5)), "bbox": [0, 0, 5, 3]},
        {"image_id": 2, "category_id": 1, "segmentation": _rle(10, 20, slice(5, 7), slice(10, 15)), "bbox": [10, 5, 5, 2]},
        # image 3: a box-only 150x150 object counts with its box: 22500 / 40000
        {"image_id": 3, "category_id": 2, "bbox": [0, 0, 150, 150]},
    ]
    for i, ann in enumerate(anns, 1):
        ann.update(id=i, iscrowd=0, area=ann["bbox"][2] * ann["bbox"][3])
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "ship"}, {"id": 2, "name": "plane"}]}))
    return path


def test_exact_values(tmp_path: Path) -> None:
    stats = dataset_stats(write_dataset(tmp_path), tmp_path)
    assert stats["instances_per_class"] == {"ship": 3, "plane": 2}
    assert [r["foreground_ratio"] for r in stats["per_image"]] == pytest.approx([0.46, 0.125, 0.5625, 0.0])
    assert stats["foreground_ratio"]["bins"] == {"[0, 0.1)": 1, "[0.1, 0.2)": 1, "[0.2, 1]": 2}
    assert stats["objects_per_image"] == {"min": 0, "median": 1.5, "mean": 1.25, "max": 2, "empty_images": 1}
    box = stats["box_size"]
    assert (box["small (<32)"], box["medium [32, 96)"], box["large (>=96)"], box["iSAID large (>=144)"]) == (4, 0, 1, 1)
    assert stats["box_sqrt_areas"] == pytest.approx([5, 5, 15 ** 0.5, 10 ** 0.5, 150])


def test_bin_edges() -> None:
    assert foreground_bins([0.0, 0.0999, 0.1, 0.1999, 0.2, 1.0]) == [2, 2, 2]


def test_command_writes_files(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    data_stats.add_arguments(parser)
    out = tmp_path / "stats"
    assert data_stats.run(parser.parse_args(["--data", str(write_dataset(tmp_path)), "--out", str(out)])) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"stats.json", "stats.md", "instances_per_class.png", "objects_per_image.png",
                     "box_sizes.png", "foreground_ratio.png"}
    saved = json.loads((out / "stats.json").read_text())
    assert "box_sqrt_areas" not in saved and saved["num_annotations"] == 5
    assert "| [0.2, 1] | 2 | 50.0% |" in (out / "stats.md").read_text()


def test_ssdd_test_split(shared_data: Path) -> None:
    ann = shared_data / "ssdd" / "annotations" / "ssdd_instances_test.json"
    if not ann.is_file():
        pytest.skip("SSDD is absent")
    stats = dataset_stats(ann, shared_data / "ssdd" / "images")
    assert stats["num_images"] == 232 and stats["instances_per_class"] == {"ship": 546}
    assert stats["foreground_ratio"]["bins"] == {"[0, 0.1)": 231, "[0.1, 0.2)": 1, "[0.2, 1]": 0}
    assert stats["objects_per_image"]["empty_images"] == 0


@pytest.mark.parametrize("vertex", [float("nan"), 1e9])
def test_bad_numbers_stop_before_rasterising(tmp_path: Path, vertex: float) -> None:
    path = tmp_path / "ann.json"
    ann = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3], "iscrowd": 0,
           "segmentation": [[1, 1, 4, 1, vertex, 4, 1, 4]]}
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}],
                                "annotations": [ann], "categories": [{"id": 1, "name": "x"}]}))
    with pytest.raises(DataError, match=r"ann\.json: annotation id 7: .*segmentation"):
        dataset_stats(path)
