"""Tests of scene tiling (``rsiseg.data.tiling``): windows, clipping, filters and the iSAID samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsiseg.data.tiling import patch_windows, split_coco
from rsiseg.structures import segmentation_to_mask

H, W = 1000, 1400
# (x1, y1, x2, y2) rectangles: one inside the first patch, one straddling x=600..800, one bottom right.
RECTS = {1: (50, 50, 150, 150), 2: (500, 50, 900, 150), 3: (1200, 900, 1300, 980)}
ISAID = Path("/work/shared/data/isaid_samples")


def _rect_polygon(x1: int, y1: int, x2: int, y2: int) -> list[list[float]]:
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def _make_scene(root: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "scene.png")
    anns = [
        {"id": i, "image_id": 7, "category_id": 1 + i % 2, "iscrowd": 0,
         "segmentation": _rect_polygon(*r), "area": float((r[2] - r[0]) * (r[3] - r[1])), "bbox": []}
        for i, r in RECTS.items()
    ]
    coco = {"images": [{"id": 7, "file_name": "scene.png", "height": H, "width": W}], "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    ann_file = root / "scene.json"
    ann_file.write_text(json.dumps(coco))
    return ann_file, pixels


def _load(out: Path) -> dict:
    return json.loads((out / "annotations" / "instances.json").read_text())


def test_windows_stride_and_flush_border() -> None:
    windows = patch_windows(1000, 2000, 800, 200)
    assert sorted({w[0] for w in windows}) == [0, 200]
    assert sorted({w[2] for w in windows}) == [0, 600, 1200]
    assert max(w[1] for w in windows) == 1000 and max(w[3] for w in windows) == 2000
    assert all(w[1] - w[0] == 800 and w[3] - w[2] == 800 for w in windows)
    assert len(windows) == 6


def test_small_image_kept_whole() -> None:
    assert patch_windows(500, 300, 800, 200) == [(0, 500, 0, 300)]
    assert patch_windows(500, 1000, 800, 200) == [(0, 500, 0, 800), (0, 500, 200, 1000)]


def test_split_clips_instances_and_records_offsets(tmp_path: Path) -> None:
    ann_file, pixels = _make_scene(tmp_path)
    summary = split_coco(ann_file, tmp_path, tmp_path / "out", progress=False)
    coco = _load(tmp_path / "out")
    assert summary["patches"] == 4 and summary["skipped"] == {}
    scene_mask = {i: segmentation_to_mask(_rect_polygon(*r), H, W) for i, r in RECTS.items()}
    images = {im["id"]: im for im in coco["images"]}
    seen: dict[int, list[tuple[int, int]]] = {}
    for ann in coco["annotations"]:
        im = images[ann["image_id"]]
        x1, y1 = im["offset"]
        y2, x2 = y1 + im["height"], x1 + im["width"]
        assert im["file_name"] == f"scene_{y1}_{y2}_{x1}_{x2}.png" and im["scene_id"] == 7
        assert im["scene_file"] == "scene.png"
        expected = scene_mask[ann["scene_ann_id"]][y1:y2, x1:x2]
        assert ann["area"] == expected.sum()
        got = segmentation_to_mask(ann["segmentation"], im["height"], im["width"])
        iou = (got & expected).sum() / (got | expected).sum()
        assert iou > 0.97
        assert ann["category_id"] == 1 + ann["scene_ann_id"] % 2
        seen.setdefault(ann["scene_ann_id"], []).append((x1, y1))
    assert set(seen) == set(RECTS)
    # The straddling rectangle is clipped in both top patches; the others are whole in one or two.
    assert sorted(seen[2]) == [(0, 0), (600, 0)]
    areas = {im_off: a["area"] for a in coco["annotations"] if a["scene_ann_id"] == 2
             for im_off in [tuple(images[a["image_id"]]["offset"])]}
    assert areas[(0, 0)] < scene_mask[2].sum() and areas[(600, 0)] < scene_mask[2].sum()
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    # Patch pixels are the scene's pixels at the recorded offset.
    for im in coco["images"]:
        x1, y1 = im["offset"]
        patch = np.asarray(Image.open(tmp_path / "out" / "images" / im["file_name"]))
        assert np.array_equal(patch, pixels[y1:y1 + im["height"], x1:x1 + im["width"]])


def test_min_visible_drops_are_counted(tmp_path: Path) -> None:
    ann_file, _ = _make_scene(tmp_path)
    summary = split_coco(ann_file, tmp_path, tmp_path / "out", min_visible=0.8, progress=False)
    # Rectangle 2 keeps 300 / 400 columns in each top patch: both fragments fall below 0.8.
    assert summary["skipped"] == {"clipped fragment below min_visible": 2}
    assert 2 not in {a["scene_ann_id"] for a in _load(tmp_path / "out")["annotations"]}


def test_max_instances_drops_full_patches(tmp_path: Path) -> None:
    ann_file, _ = _make_scene(tmp_path)
    summary = split_coco(ann_file, tmp_path, tmp_path / "out", max_instances_per_image=1, progress=False)
    assert summary["skipped"] == {"patch over max_instances": 1}  # top-left holds rectangles 1 and 2
    offsets = {tuple(im["offset"]) for im in _load(tmp_path / "out")["images"]}
    assert (0, 0) not in offsets and summary["patches"] == 3


def test_max_empty_fraction_is_honoured_and_deterministic(tmp_path: Path) -> None:
    ann_file, _ = _make_scene(tmp_path)
    summary = split_coco(ann_file, tmp_path, tmp_path / "out", max_empty_fraction=0.0, progress=False)
    assert summary["skipped"] == {"empty patch dropped": 1} and summary["patches"] == 3
    # A blank 2000x2000 scene: 9 empty patches, half of them (rounded down) kept.
    Image.fromarray(np.zeros((2000, 2000), dtype=np.uint8)).save(tmp_path / "blank.png")
    blank = tmp_path / "blank.json"
    blank.write_text(json.dumps({"images": [{"id": 1, "file_name": "blank.png", "height": 2000, "width": 2000}],
                                 "annotations": [], "categories": []}))
    kept = []
    for run in ("a", "b"):
        s = split_coco(blank, tmp_path, tmp_path / run, max_empty_fraction=0.5, seed=3, progress=False)
        assert s["patches"] == 4 and s["skipped"] == {"empty patch dropped": 5}
        kept.append(sorted(im["file_name"] for im in _load(tmp_path / run)["images"]))
    assert kept[0] == kept[1]


def test_uint16_scene_keeps_dtype(tmp_path: Path) -> None:
    pixels = (np.arange(900 * 900, dtype=np.uint32).reshape(900, 900) % 65535).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "sar.png")
    ann_file = tmp_path / "sar.json"
    ann_file.write_text(json.dumps({"images": [{"id": 1, "file_name": "sar.png", "height": 900, "width": 900}],
                                    "annotations": [], "categories": []}))
    split_coco(ann_file, tmp_path, tmp_path / "out", progress=False)
    patch = np.asarray(Image.open(tmp_path / "out" / "images" / "sar_100_900_100_900.png"))
    assert patch.dtype == np.uint16 and np.array_equal(patch, pixels[100:, 100:])


def test_isaid_samples_are_covered_by_patches(tmp_path: Path) -> None:
    if not ISAID.is_dir():
        pytest.skip("iSAID samples not available")
    from rsiseg.data.converters.isaid import convert_isaid

    convert_isaid(ISAID, tmp_path / "coco", progress=False)
    scenes = json.loads((tmp_path / "coco" / "annotations" / "instances.json").read_text())
    summary = split_coco(tmp_path / "coco" / "annotations" / "instances.json", ISAID, tmp_path / "out",
                         size=512, overlap=128, progress=False)
    assert summary["patches"] > len(scenes["images"])
    coco = _load(tmp_path / "out")
    images = {im["id"]: im for im in coco["images"]}
    scene_by_id = {im["id"]: im for im in scenes["images"]}
    covered: dict[int, np.ndarray] = {}
    keys = set()
    for ann in coco["annotations"]:
        im = images[ann["image_id"]]
        key = (ann["scene_ann_id"], ann["image_id"])
        assert key not in keys  # one fragment per instance and patch
        keys.add(key)
        scene = scene_by_id[im["scene_id"]]
        canvas = covered.setdefault(ann["scene_ann_id"], np.zeros((scene["height"], scene["width"]), bool))
        x1, y1 = im["offset"]
        canvas[y1:y1 + im["height"], x1:x1 + im["width"]] |= segmentation_to_mask(
            ann["segmentation"], im["height"], im["width"]).astype(bool)
    for ann in scenes["annotations"]:
        scene = scene_by_id[ann["image_id"]]
        original = segmentation_to_mask(ann["segmentation"], scene["height"], scene["width"]).astype(bool)
        assert ann["id"] in covered
        assert (covered[ann["id"]] & original).sum() == original.sum(), ann["id"]
