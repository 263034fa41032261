"""Bad input, table-driven: bad numbers at load and in validate, runs that would do nothing,
repeated file names, scenes that would overwrite each other's patches, and partial output.

Command-line cases assert the exit code, a one-line message naming the file and the field or
folder, no traceback, and that nothing is left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsiseg.cli import main
from rsiseg.data.coco_index import DataError, load_coco_index
from rsiseg.data.tiling import patch_stems, split_coco
from rsiseg.data.validate import fix_coco, validate_coco

FORMATS = ["isaid", "hrsid", "ssdd", "nwpu", "yolo", "whu", "potsdam"]
SQUARE = [10, 10, 20, 10, 20, 20, 10, 20]


def _dataset(root: Path, anns: list[dict], names: tuple[str, ...] = ("a.png",)) -> tuple[Path, Path]:
    """64x48 images ``names`` under ``root/images`` and a COCO file with ``anns`` on image 1."""
    images = root / "images"
    for name in names:
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48)).save(images / name)
    entries = [{"id": i, "file_name": n, "height": 48, "width": 64} for i, n in enumerate(names, start=1)]
    full = [{"id": k, "image_id": 1, "category_id": 1, "segmentation": [SQUARE], "bbox": [10, 10, 10, 10],
             "area": 100.0, "iscrowd": 0} | a for k, a in enumerate(anns, start=1)]
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": entries, "annotations": full, "categories": [{"id": 1, "name": "x"}]}))
    return ann_file, images


def _says(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    captured = capsys.readouterr()
    text = captured.err + captured.out
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


BAD_NUMBERS = [
    ({"segmentation": [[10, 10, float("nan"), 10, 20, 20]]}, "non-finite number", "'segmentation[0]' holds nan"),
    ({"bbox": [10, 10, float("inf"), 10]}, "non-finite number", "'bbox' holds inf"),
    ({"area": float("nan")}, "non-finite number", "'area' holds nan"),
    ({"segmentation": [[10, 10, 1e9, 10, 20, 20]]}, "coordinate far outside image", "'segmentation[0]' reaches"),
    ({"bbox": [-200, 10, 5, 5], "segmentation": None}, "coordinate far outside image", "'bbox' reaches"),
]


@pytest.mark.parametrize("bad, kind, detail", BAD_NUMBERS)
def test_bad_numbers_refused_at_load_and_counted_when_repairing(bad: dict, kind: str, detail: str,
                                                               tmp_path: Path) -> None:
    ann_file, images = _dataset(tmp_path, [{}, bad])
    with pytest.raises(DataError) as err:
        load_coco_index(ann_file, images)
    message = str(err.value)
    assert str(ann_file) in message and "annotation id 2 (image a.png)" in message and detail in message
    assert "rsiseg data validate --fix" in message  # a hint every command can follow
    index = load_coco_index(ann_file, images, repair=True)
    assert index.report.counts == {kind: 1} and [a["id"] for a in index.anns_by_image[1]] == [1]


@pytest.mark.parametrize("bad, kind, detail", BAD_NUMBERS)
def test_bad_numbers_reported_by_validate_and_dropped_by_fix(bad: dict, kind: str, detail: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    ann_file, images = _dataset(tmp_path, [{}, bad])
    report = validate_coco(ann_file, images, progress=False)
    assert dict(report.counts) == {kind: 1} and not report.ok
    assert report.examples[kind][0].startswith("annotation id 2 (image a.png)") and detail in report.examples[kind][0]
    fixed, actions = fix_coco(ann_file)
    assert actions == {f"dropped annotation: {kind}": 1} and [a["id"] for a in fixed["annotations"]] == [1]
    assert main(["-q", "data", "validate", "--data", str(ann_file), "--images", str(images)]) == 1
    _says(capsys, kind, "annotation id 2", "rerun with --fix OUT.json")


def test_validate_refuses_empty_and_repeated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ann_file, images = _dataset(tmp_path, [{}], names=("a.png", "b.png"))
    raw = json.loads(ann_file.read_text())
    raw["images"][1]["file_name"] = "a.png"
    ann_file.write_text(json.dumps(raw))
    report = validate_coco(ann_file, images, progress=False)
    assert report.counts == {"duplicate file_name": 1} and "'a.png' of image id 1" in report.examples["duplicate file_name"][0]
    ann_file.write_text(json.dumps({**raw, "images": [], "annotations": []}))
    assert validate_coco(ann_file, images, progress=False).counts == {"no images": 1}
    with pytest.raises(DataError, match=r"ann\.json: field 'images' is empty"):
        load_coco_index(ann_file, images)
    assert main(["-q", "data", "validate", "--data", str(ann_file), "--images", str(images)]) == 1
    assert main(["-q", "data", "validate", "--data", str(ann_file), "--images", str(tmp_path / "nowhere")]) == 2
    _says(capsys, str(tmp_path / "nowhere"), "--images")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("state", ["missing", "empty"])
def test_missing_or_empty_source_fails(fmt: str, state: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    if state == "empty":
        src.mkdir()
    out = tmp_path / "out"
    assert main(["-q", "data", "convert", fmt, "--src", str(src), "--out", str(out)]) == 2
    _says(capsys, str(src), "does not exist" if state == "missing" else "is empty")
    assert not out.exists()


def _zero_image_sources(src: Path, fmt: str) -> None:
    """A source folder that is not empty yet holds no image for ``fmt``."""
    empty_coco = json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "ship"}]})
    if fmt in ("ssdd", "nwpu", "hrsid"):
        (src / "annotations").mkdir(parents=True)
        (src / "annotations" / "all.json").write_text(empty_coco)
    elif fmt == "yolo":
        (src / "images" / "train").mkdir(parents=True)
        (src / "data.yaml").write_text("train: images/train\nnames: [car]\n")
    elif fmt == "whu":
        for sub in ("train/image", "train/label"):
            (src / sub).mkdir(parents=True)
    elif fmt == "isaid":
        src.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(src / "P0001_instance_id_RGB.png")  # no image, no class PNG


@pytest.mark.parametrize("fmt", ["isaid", "ssdd", "nwpu", "hrsid", "yolo", "whu"])
def test_zero_images_fails(fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _zero_image_sources(tmp_path / "src", fmt)
    assert main(["-q", "data", "convert", fmt, "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    _says(capsys, "no images found", str(tmp_path))
    assert not (tmp_path / "out").exists()


def test_potsdam_leaves_no_partial_masks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((2, 2, 3), 255, np.uint8)).save(src / "a_label.png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(src / "b_label.png")  # not RGB: refused after a_label
    assert main(["-q", "data", "convert", "potsdam", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    _says(capsys, "b_label.png", "8-bit RGB")
    assert not (tmp_path / "out").exists()


def test_whu_leaves_nothing_when_a_later_split_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    for split, label_shape in (("train", (8, 8)), ("val", (4, 8))):
        (src / split / "image").mkdir(parents=True)
        (src / split / "label").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(src / split / "image" / "t.png")
        Image.fromarray(np.zeros(label_shape, np.uint8)).save(src / split / "label" / "t.png")
    assert main(["-q", "data", "convert", "whu", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    _says(capsys, str(src / "val" / "label" / "t.png"), "differs from its image")
    assert not (tmp_path / "out").exists()


def test_split_keeps_scenes_with_the_same_stem_apart(tmp_path: Path) -> None:
    ann_file, images = _dataset(tmp_path, [{}], names=("a/x.png", "b/x.png", "y.png"))
    raw = json.loads(ann_file.read_text())
    raw["annotations"].append({**raw["annotations"][0], "id": 2, "image_id": 2,
                               "segmentation": [[30, 30, 40, 30, 40, 40]], "bbox": [30, 30, 10, 10]})
    ann_file.write_text(json.dumps(raw))
    summary = split_coco(ann_file, images, tmp_path / "out", size=64, overlap=0, progress=False)
    out = json.loads(Path(summary["annotations"]).read_text())
    names = [img["file_name"] for img in out["images"]]
    assert names == ["a__x_0_48_0_64.png", "b__x_0_48_0_64.png", "y_0_48_0_64.png"]
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == sorted(names)
    assert [a["image_id"] for a in out["annotations"]] == [1, 2]
    assert patch_stems(["a/x.png", "a/x.tif"]) == {"a/x.png": "x", "a/x.tif": "x"}  # suffixes keep them apart
    with pytest.raises(DataError, match=r"file_name listed by more than one image: \['a/x.png'\]"):
        patch_stems(["a/x.png", "a/x.png"])


def test_no_message_suggests_an_option_the_command_lacks() -> None:
    src = Path(__file__).resolve().parents[2] / "src" / "rsiseg"
    for module in ("data/validate.py", "commands/data_validate.py", "commands/data_convert.py",
                   *(str(p.relative_to(src)) for p in (src / "data" / "converters").glob("*.py"))):
        assert "data.repair" not in (src / module).read_text(), module
