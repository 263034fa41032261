"""``rsiseg data validate``: every problem kind counted, exit codes, and --fix output that validates."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsiseg.commands import data_validate
from rsiseg.data.validate import KINDS, fix_coco, validate_coco
from rsiseg.structures import mask_to_rle

SQUARE = [[10, 10, 20, 10, 20, 20, 10, 20]]  # a valid polygon inside the 64x48 image


def _ann(ann_id: int, **kw) -> dict:
    return {"id": ann_id, "image_id": 1, "category_id": 1, "segmentation": SQUARE,
            "bbox": [10, 10, 10, 10], "area": 100, "iscrowd": 0} | kw


def write_broken(root: Path, unfixable: bool = True) -> tuple[Path, Path]:
    """A 64x48 image with one annotation of each problem kind, plus bad image entries."""
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (64, 48)).save(images / "a.png")
    Image.new("L", (40, 40)).save(images / "e.png")
    (images / "d.png").write_bytes(b"not a png at all")
    imgs = [{"id": 1, "file_name": "a.png", "height": 48, "width": 64},
            {"id": 3, "file_name": "c.png", "height": 32, "width": 32},   # missing file
            {"id": 4, "file_name": "d.png", "height": 32, "width": 32}]   # unreadable
    if unfixable:
        imgs += [{"id": 5, "file_name": "e.png", "height": 50, "width": 50},  # size mismatch
                 {"id": 5, "file_name": "a.png", "height": 48, "width": 64}]  # duplicate image id
    wrong_rle = mask_to_rle(np.ones((10, 10), np.uint8))
    anns = [
        _ann(1),
        _ann(1),                                                               # duplicate annotation id
        _ann(3, category_id=99),                                               # unknown category id
        _ann(4, image_id=999),                                                 # unknown image id
        _ann(5, segmentation=[[0, 0, 5, 5]], bbox=[0, 0, 5, 5]),               # < 3 points
        _ann(6, segmentation=[[0, 0, 5, 5, 9]], bbox=[0, 0, 5, 5]),            # malformed (odd length)
        _ann(7, segmentation=[[0, 0, 5, 5, 10, 10]], bbox=[0, 0, 10, 10]),     # zero area
        _ann(8, segmentation=[[0, 0, 20, 0, 0, 10, 10, 10]], bbox=[0, 0, 20, 10]),  # self-intersection
        _ann(9, segmentation=wrong_rle),                                       # RLE size mismatch (a bad RLE)
        _ann(10, bbox=[10, 10, 0, 5]),                                         # zero-area box
        _ann(11, segmentation=[[50, 10, 66, 10, 66, 20, 50, 20]], bbox=[50, 10, 16, 10]),  # beyond border
        _ann(12, bbox=[30, 30, 10, 10]),                                       # box far from its mask
        _ann(13, segmentation=None, bbox=[70, 50, 5, 5]),                      # box outside image
        {k: v for k, v in _ann(14).items() if k != "bbox"},                    # missing bbox
        _ann(15, image_id=3),                                                  # on the missing image
    ]
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": imgs, "annotations": anns,
                                    "categories": [{"id": 1, "name": "ship"}]}))
    return ann_file, images


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    data_validate.add_arguments(parser)
    return data_validate.run(parser.parse_args(argv))


def test_every_kind_counted(tmp_path: Path) -> None:
    ann_file, images = write_broken(tmp_path)
    report = validate_coco(ann_file, images, progress=False)
    # The kinds added for bad numbers, empty files and repeated file names have their own tests
    # (tests/data/test_bad_input.py).
    expected = {k: 1 for k in KINDS if k not in ("duplicate category id", "malformed image entry",
                                                 "malformed annotation", "bad segmentation", "no images",
                                                 "malformed category entry", "bad iscrowd",
                                                 "duplicate file_name", "non-finite number",
                                                 "coordinate far outside image")}
    assert dict(report.counts) == expected
    assert report.warnings == {"self-intersecting polygon": 1, "box inconsistent with mask": 1}
    assert not report.ok and report.unusable_images == {3, 4}
    assert report.examples["box inconsistent with mask"][0].startswith("annotation id 12 (image a.png)")
    assert "d.png" in report.examples["unreadable image"][0]


def test_command_exit_code_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ann_file, images = write_broken(tmp_path)
    out = tmp_path / "report.json"
    assert _run(["--data", str(ann_file), "--images", str(images), "--report", str(out)]) == 1
    saved = json.loads(out.read_text())
    assert saved["errors"] == 15 and saved["warnings"] == 2
    assert saved["problems"]["zero-area box"] == {"severity": "error", "count": 1,
                                                  "examples": [saved["problems"]["zero-area box"]["examples"][0]]}
    assert "duplicate annotation id" in capsys.readouterr().out


def test_fix_repairs_everything_fixable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ann_file, images = write_broken(tmp_path, unfixable=False)
    fixed_file = tmp_path / "fixed.json"
    assert _run(["--data", str(ann_file), "--images", str(images), "--fix", str(fixed_file)]) == 1
    assert "renumbered annotation id" in capsys.readouterr().out
    _, actions = fix_coco(ann_file, {3, 4})
    assert dict(actions) == {
        "dropped unusable image": 2, "dropped annotation of unusable image": 1,
        "dropped annotation: unknown category id": 1, "dropped annotation: unknown image id": 1,
        "removed degenerate polygon": 3, "dropped annotation: no valid polygon left": 3,
        "dropped annotation: bad RLE": 1, "dropped annotation: zero-area box": 1,
        "dropped annotation: box outside image": 1, "clipped box to image": 1,
        "recomputed bbox from mask": 2, "renumbered annotation id": 1,
    }
    fixed = json.loads(fixed_file.read_text())
    by_id = {a["id"]: a for a in fixed["annotations"]}
    assert sorted(by_id) == [1, 8, 11, 12, 14, 15]  # the duplicate 1 becomes max + 1
    assert by_id[11]["bbox"] == [50, 10, 14, 10] and by_id[12]["bbox"] == [10, 10, 10, 10]
    report = validate_coco(fixed_file, images, progress=False)
    assert report.ok and dict(report.counts) == {"self-intersecting polygon": 1}
    assert _run(["--data", str(fixed_file), "--images", str(images)]) == 0  # warnings alone pass


def test_fix_leaves_unfixable_kinds(tmp_path: Path) -> None:
    ann_file, images = write_broken(tmp_path)
    report = validate_coco(ann_file, images, progress=False)
    fixed, _ = fix_coco(ann_file, report.unusable_images)
    fixed_file = tmp_path / "fixed.json"
    fixed_file.write_text(json.dumps(fixed))
    again = validate_coco(fixed_file, images, progress=False)
    assert again.errors == {"duplicate image id": 1, "image size mismatch": 1}


def test_ssdd_test_split_is_clean(shared_data: Path) -> None:
    root = shared_data / "ssdd"
    if not (root / "annotations" / "ssdd_instances_test.json").is_file():
        pytest.skip("SSDD is absent")
    report = validate_coco(root / "annotations" / "ssdd_instances_test.json", root / "images", progress=False)
    assert (report.num_images, report.num_annotations) == (232, 546)
    assert report.ok and not report.counts
