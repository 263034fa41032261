"""``rsiseg data subset``: sizes, a reproducible draw independent of image order, and named errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from rsiseg.commands import data_subset
from rsiseg.data.coco_index import DataError
from rsiseg.data.subset import pick_image_ids, subset_coco, subset_size

NUM_IMAGES = 20


def make_coco(num_images: int = NUM_IMAGES, reverse: bool = False) -> dict:
    """``num_images`` images (ids 101, 102, ...); image ``k`` holds ``k % 3`` annotations, classes 1 and 2."""
    images = [{"id": 100 + k, "file_name": f"img_{k:03d}.png", "height": 64, "width": 64}
              for k in range(1, num_images + 1)]
    annotations = []
    for k in range(1, num_images + 1):
        for j in range(k % 3):
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + k, "category_id": 1 + j % 2,
                                "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0,
                                "segmentation": [[1, 1, 11, 1, 11, 11, 1, 11]]})
    if reverse:
        images, annotations = images[::-1], annotations[::-1]
    return {"info": {"description": "tiny"}, "licenses": [{"id": 1, "name": "CC"}], "extra_key": [1, 2, 3],
            "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "ship"}, {"id": 2, "name": "plane"}]}


def write(path: Path, coco: dict) -> Path:
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture
def coco_file(tmp_path: Path) -> Path:
    return write(tmp_path / "instances.json", make_coco())


def kept_ids(path: Path) -> list[int]:
    return [img["id"] for img in json.loads(path.read_text())["images"]]


@pytest.mark.parametrize(("n", "fraction", "expected"), [(20, 0.4, 8), (20, 1.0, 20), (20, 0.01, 1),
                                                           (10, 0.25, 2), (1, 0.1, 1), (0, 0.5, 0)])
def test_fraction_size_rounds_and_keeps_at_least_one(n: int, fraction: float, expected: int) -> None:
    assert subset_size(n, fraction=fraction) == expected


def test_fraction_and_count_give_the_asked_size(coco_file: Path, tmp_path: Path) -> None:
    summary = subset_coco(coco_file, tmp_path / "f.json", fraction=0.4, seed=42)
    assert len(kept_ids(tmp_path / "f.json")) == summary["images_kept"] == 8
    assert summary["images_total"] == NUM_IMAGES
    assert summary["fraction"] == 0.4 and summary["count"] is None and summary["seed"] == 42
    summary = subset_coco(coco_file, tmp_path / "c.json", count=5)
    assert len(kept_ids(tmp_path / "c.json")) == summary["images_kept"] == 5
    assert summary["count"] == 5 and summary["fraction"] is None


def test_same_seed_same_subset_other_seed_other_subset(coco_file: Path, tmp_path: Path) -> None:
    subset_coco(coco_file, tmp_path / "a.json", fraction=0.5, seed=7)
    subset_coco(coco_file, tmp_path / "b.json", fraction=0.5, seed=7)
    subset_coco(coco_file, tmp_path / "c.json", fraction=0.5, seed=8)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    # 184756 ways to pick 10 of 20: two seeds agreeing would be a broken draw, not luck.
    assert set(kept_ids(tmp_path / "a.json")) != set(kept_ids(tmp_path / "c.json"))


def test_image_order_in_file_does_not_change_the_pick(coco_file: Path, tmp_path: Path) -> None:
    shuffled = write(tmp_path / "reversed.json", make_coco(reverse=True))
    subset_coco(coco_file, tmp_path / "a.json", fraction=0.4, seed=3)
    subset_coco(shuffled, tmp_path / "b.json", fraction=0.4, seed=3)
    ids_a, ids_b = kept_ids(tmp_path / "a.json"), kept_ids(tmp_path / "b.json")
    assert set(ids_a) == set(ids_b)
    # each output keeps the images in their input file's order
    assert ids_a == sorted(ids_a) and ids_b == sorted(ids_b, reverse=True)


def test_smaller_subset_lies_inside_larger_one_for_a_seed() -> None:
    ids = list(range(1000, 1100))
    assert pick_image_ids(ids, 10, seed=5) <= pick_image_ids(ids, 40, seed=5)
    assert pick_image_ids(ids, 100, seed=5) == set(ids)


def test_only_kept_images_annotations_remain_and_other_keys_are_copied(coco_file: Path, tmp_path: Path) -> None:
    source = json.loads(coco_file.read_text())
    summary = subset_coco(coco_file, tmp_path / "s.json", fraction=0.5, seed=1)
    out = json.loads((tmp_path / "s.json").read_text())
    kept = {img["id"] for img in out["images"]}
    expected = [a for a in source["annotations"] if a["image_id"] in kept]
    assert out["annotations"] == expected  # all of them, unchanged, in file order
    assert [img for img in source["images"] if img["id"] in kept] == out["images"]
    for key in ("categories", "info", "licenses", "extra_key"):
        assert out[key] == source[key]
    assert summary["annotations_kept"] == len(expected)
    assert summary["annotations_total"] == len(source["annotations"])
    per_category = {c["id"]: c for c in summary["categories"]}
    assert [c["name"] for c in summary["categories"]] == ["ship", "plane"]
    for cat_id in (1, 2):
        assert per_category[cat_id]["annotations_kept"] == sum(a["category_id"] == cat_id for a in expected)
        assert per_category[cat_id]["annotations_total"] == sum(
            a["category_id"] == cat_id for a in source["annotations"])


def test_refuses_a_file_that_is_not_coco_instances(tmp_path: Path) -> None:
    coco = make_coco()
    del coco["annotations"]
    path = write(tmp_path / "results.json", coco)
    with pytest.raises(DataError, match=r"results\.json.*'annotations'"):
        subset_coco(path, tmp_path / "out.json", fraction=0.5)
    assert not (tmp_path / "out.json").exists()


def test_refuses_annotations_of_unknown_images_and_counts_them(tmp_path: Path) -> None:
    coco = make_coco()
    coco["annotations"][0]["image_id"] = 9999
    coco["annotations"][3]["image_id"] = 8888
    path = write(tmp_path / "orphans.json", coco)
    with pytest.raises(DataError, match=r"orphans\.json: field 'image_id' of 2 of \d+ annotations") as err:
        subset_coco(path, tmp_path / "out.json", count=3)
    assert "9999" in str(err.value) and "8888" in str(err.value)
    assert not (tmp_path / "out.json").exists()


def test_refuses_duplicate_or_missing_image_ids(tmp_path: Path) -> None:
    coco = make_coco()
    coco["images"][4]["id"] = coco["images"][2]["id"]
    with pytest.raises(DataError, match=r"dup\.json: images\[4\] field 'id': duplicate"):
        subset_coco(write(tmp_path / "dup.json", coco), tmp_path / "out.json", count=3)
    del coco["images"][1]["id"]
    with pytest.raises(DataError, match=r"noid\.json: images\[1\] field 'id'"):
        subset_coco(write(tmp_path / "noid.json", coco), tmp_path / "out.json", count=3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "exactly one of fraction and count"),
    ({"fraction": 0.5, "count": 3}, "exactly one of fraction and count"),
    ({"fraction": 0.0}, r"fraction must be a number in \(0, 1\]"),
    ({"fraction": 1.5}, r"fraction must be a number in \(0, 1\]"),
    ({"fraction": float("nan")}, r"fraction must be a number in \(0, 1\]"),
    ({"count": 0}, "count must be an integer >= 1"),
    ({"count": 2.5}, "count must be an integer >= 1"),
    ({"count": NUM_IMAGES + 1}, f"count {NUM_IMAGES + 1} is more than the {NUM_IMAGES} images"),
    ({"count": 3, "seed": -1}, "seed must be an integer >= 0"),
])
def test_refuses_bad_fraction_count_or_seed(coco_file: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        subset_coco(coco_file, tmp_path / "out.json", **kwargs)
    assert not (tmp_path / "out.json").exists()


def test_refuses_to_overwrite_its_input(coco_file: Path) -> None:
    before = coco_file.read_bytes()
    with pytest.raises(ValueError, match="overwrite the input"):
        subset_coco(coco_file, coco_file, fraction=0.5)
    assert coco_file.read_bytes() == before


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    data_subset.add_arguments(parser)
    return parser.parse_args(argv)


def test_command_writes_the_subset_and_prints_the_summary(coco_file: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "subset.json"
    args = _parse(["--data", str(coco_file), "--out", str(out), "--fraction", "0.4", "--seed", "42"])
    assert data_subset.run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images_kept"] == 8 and summary["seed"] == 42
    assert summary["out"] == str(out) and len(kept_ids(out)) == 8
    direct = tmp_path / "direct.json"
    subset_coco(coco_file, direct, fraction=0.4, seed=42)
    assert out.read_bytes() == direct.read_bytes()


@pytest.mark.parametrize("argv", [[], ["--fraction", "0.4", "--count", "3"], ["--count", "0"],
                                  ["--count", "3", "--seed", "-1"]])
def test_command_flags_need_exactly_one_valid_size(coco_file: Path, argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(["--data", str(coco_file), "--out", "x.json", *argv])
