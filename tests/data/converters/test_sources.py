"""Converter sources: several annotation files, bad numbers, YOLO splits, names with gaps, degenerate polygons.

Each refusal is checked through the command line: exit code 2, a one-line message naming the file
and the field or annotation, no traceback, and no output folder left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsiseg.cli import main
from rsiseg.data.validate import validate_coco

CATS = [{"id": 1, "name": "ship"}]


def _coco(numbers: list[int], **ann_kw) -> dict:
    images = [{"id": n, "file_name": f"{n:06d}.jpg", "height": 20, "width": 30} for n in numbers]
    anns = [{"id": n, "image_id": n, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16.0,
             "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]], "iscrowd": 0} | ann_kw for n in numbers]
    return {"images": images, "annotations": anns, "categories": CATS}


def _write(path: Path, coco: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))
    return path


def _convert(fmt: str, src: Path, out: Path, *extra: str) -> int:
    return main(["-q", "data", "convert", fmt, "--src", str(src), "--out", str(out), *extra])


def _refused(capsys: pytest.CaptureFixture[str], out: Path, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists(), "a refused run left output behind"
    return err


def test_train_val_and_all_files_are_merged_not_first_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ann = tmp_path / "src" / "annotations"
    _write(ann / "ds_all.json", _coco(list(range(1, 11))))
    _write(ann / "ds_train.json", _coco(list(range(1, 8))))
    _write(ann / "ds_val.json", _coco([8, 9, 10, 11, 12]))  # 11 and 12 are only here
    assert main(["data", "convert", "nwpu", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["train"]["images"] + summary["val"]["images"] == 12
    assert summary["read"][str(ann / "ds_all.json")] == {"images": 10, "new_images": 10}
    assert summary["read"][str(ann / "ds_val.json")] == {"images": 5, "new_images": 2}
    assert summary["merged"] == {"repeated images (same size and annotations, kept once)": 10}
    assert summary["skipped"] == {}
    assert f"read {ann / 'ds_train.json'}: 7 images (0 not in an earlier file)" in captured.err
    # --ann reads only the file named
    assert _convert("nwpu", tmp_path / "src", tmp_path / "one", "--ann", str(ann / "ds_train.json")) == 0
    assert json.loads(capsys.readouterr().out)["read"] == {str(ann / "ds_train.json"): {"images": 7, "new_images": 7}}


def test_conflicting_files_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ann = tmp_path / "src" / "annotations"
    _write(ann / "a_all.json", _coco([1, 2, 9]))
    _write(ann / "b_test.json", _coco([9], bbox=[2, 2, 4, 4]))
    assert _convert("ssdd", tmp_path / "src", tmp_path / "out") == 2
    _refused(capsys, tmp_path / "out", "b_test.json", "'000009.jpg'", "a_all.json", "--ann")
    _write(ann / "b_test.json", {**_coco([9]), "categories": [{"id": 1, "name": "boat"}]})
    assert _convert("ssdd", tmp_path / "src", tmp_path / "out") == 2
    _refused(capsys, tmp_path / "out", "b_test.json", "category id 1", "'boat'", "'ship'")
    repeated = _coco([3, 4])
    repeated["images"][1]["id"], repeated["annotations"] = 3, []
    _write(ann / "b_test.json", repeated)
    assert _convert("ssdd", tmp_path / "src", tmp_path / "out") == 2
    _refused(capsys, tmp_path / "out", "b_test.json", "images[1] (000004.jpg) repeats image id 3")


@pytest.mark.parametrize("fmt", ["ssdd", "nwpu", "hrsid"])
@pytest.mark.parametrize("field, value, needle", [
    ("segmentation", [[1, 1, float("nan"), 1, 5, 5]], "field 'segmentation[0]' holds nan"),
    ("bbox", [1, 1, float("inf"), 4], "field 'bbox' holds inf"),
    ("bbox", [1, 1, 1e12, 4], "field 'bbox' reaches"),
    ("area", float("nan"), "field 'area' holds nan"),
])
def test_bad_numbers_in_coco_sources(fmt: str, field: str, value, needle: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    coco = _coco([1, 9, 11])
    coco["annotations"][1][field] = value
    _write(tmp_path / "src" / "annotations" / "all.json", coco)
    assert _convert(fmt, tmp_path / "src", tmp_path / "out") == 2
    _refused(capsys, tmp_path / "out", "all.json", "annotation id 9", "000009.jpg", needle, "--skip-invalid")
    assert _convert(fmt, tmp_path / "src", tmp_path / "out", "--skip-invalid") == 0
    summary = json.loads(capsys.readouterr().out)
    assert sum(summary["skipped"].values()) == 1 and "annotation id 9" in str(summary["skipped_examples"])


def test_option_for_another_format_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "src" / "all.json", _coco([1]))
    assert _convert("ssdd", tmp_path / "src", tmp_path / "out", "--split", "val") == 2
    _refused(capsys, tmp_path / "out", "--split does not apply to ssdd")


def _yolo(root: Path, names, labels: dict[str, str], splits: dict[str, str]) -> Path:
    for split in {"train", "val"} & set(labels):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(root / "images" / split / "a.png")
        (root / "labels" / split / "a.txt").write_text(labels[split])
    lines = [f"{k}: {v}" for k, v in splits.items()] + [f"names: {json.dumps(names)}"]
    (root / "data.yaml").write_text("\n".join(lines) + "\n")
    return root


def test_yolo_missing_split_and_split_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _yolo(tmp_path / "src", ["car"], {"train": "0 0.1 0.1 0.5 0.1 0.5 0.5\n"},
                {"train": "images/train", "val": "images/val", "test": "images/test"})
    assert main(["data", "convert", "yolo", "--src", str(src), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert list(summary["splits"]) == ["train"] and set(summary["missing_splits"]) == {"val", "test"}
    assert f"missing split 'val': {src / 'images' / 'val'} does not exist" in captured.err
    assert sorted(p.name for p in (tmp_path / "out" / "annotations").iterdir()) == ["instances_train.json"]
    assert _convert("yolo", src, tmp_path / "v", "--split", "val") == 2
    _refused(capsys, tmp_path / "v", "data.yaml", "field 'val'", "images/val")
    assert _convert("yolo", src, tmp_path / "t", "--split", "train") == 0
    assert list(json.loads(capsys.readouterr().out)["splits"]) == ["train"]
    (src / "data.yaml").write_text("train: images/nowhere\nnames: [car]\n")
    assert _convert("yolo", src, tmp_path / "none") == 2
    _refused(capsys, tmp_path / "none", "data.yaml", "images/nowhere")


def test_yolo_names_with_gaps_keep_their_ids(tmp_path: Path) -> None:
    src = _yolo(tmp_path / "src", {0: "car", 2: "plane"}, {"train": "2 0.1 0.1 0.5 0.1 0.5 0.5\n0 0.1 0.1 0.3 0.1 0.3 0.3\n"},
                {"train": "images/train"})
    assert _convert("yolo", src, tmp_path / "out") == 0
    coco = json.loads((tmp_path / "out" / "annotations" / "instances_train.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "car"}, {"id": 3, "name": "plane"}]
    assert [a["category_id"] for a in coco["annotations"]] == [3, 1]


def test_yolo_degenerate_polygons_dropped_and_output_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [
        "0 0.1 0.1 0.5 0.1 0.5 0.5",            # good triangle
        "0 0.1 0.1 0.1 0.1 0.5 0.5",            # 2 distinct points
        "0 0.1 0.1 0.2 0.2 0.3 0.3",            # collinear: no area
        "0 1.2 0.1 1.5 0.2 1.5 0.5",            # all beyond the right border: no area after clipping
        "0 0.1 nan 0.5 0.1 0.5 0.5",            # non-finite
        "0 0.1 0.1 0.5 inf 0.5 0.5",            # non-finite
        "0 0.1 0.1 9.5 0.1 0.5 0.5",            # far outside
    ]
    src = _yolo(tmp_path / "src", ["car"], {"train": "\n".join(lines) + "\n"}, {"train": "images/train"})
    assert _convert("yolo", src, tmp_path / "out") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"] == {"images": 1, "instances": 1}
    assert summary["problems"] == {"polygon with < 3 distinct points (skipped)": 1,
                                   "zero-area polygon after clipping to the image (skipped)": 2,
                                   "non-finite coordinate (skipped)": 2,
                                   "coordinate far outside the image (skipped)": 1}
    assert summary["problem_examples"]["non-finite coordinate (skipped)"][0].endswith("a.txt:5")
    report = validate_coco(tmp_path / "out" / "annotations" / "instances_train.json", src, progress=False)
    assert report.ok, report.summary()


def test_yolo_split_as_folder_list_or_txt_and_ann_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _yolo(tmp_path / "src", ["car"], {"train": "0 0.1 0.1 0.5 0.1 0.5 0.5\n", "val": ""}, {})
    (src / "val.txt").write_text("images/val/a.png\n")
    spec = tmp_path / "elsewhere" / "my.yaml"
    spec.parent.mkdir()
    spec.write_text(f"path: {src}\ntrain: [images/train, images/val]\nval: val.txt\nnames: [car]\n")
    assert _convert("yolo", src, tmp_path / "out", "--ann", str(spec)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"train": {"images": 2, "instances": 1}, "val": {"images": 1, "instances": 0}}
    assert summary["images_root"] == str(src)
    spec.write_text(f"path: {src}\ntrain: [images/train, images/gone]\nnames: [car]\n")
    assert _convert("yolo", src, tmp_path / "gone", "--ann", str(spec)) == 2
    _refused(capsys, tmp_path / "gone", "my.yaml", "field 'train'", "images/gone")
