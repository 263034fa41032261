"""Tests of ``rsiseg.data.merge``: split a scene, feed the patch ground truth back, merge, compare."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from rsiseg.commands import data_merge
from rsiseg.data.merge import make_item, merge_predictions
from rsiseg.data.tiling import split_coco
from rsiseg.structures import segmentation_to_rle

H, W = 1000, 1400
ISAID = Path("/work/shared/data/isaid_samples")
# (x1, y1, x2, y2, category). Windows at size 800 / overlap 200: x in [0, 800), [600, 1400); y in [0, 800), [200, 1000).
RECTS = [
    (50, 50, 150, 150, 1),      # one patch only
    (500, 50, 900, 150, 1),     # cut by x = 600 and x = 800
    (650, 300, 750, 400, 2),    # inside the overlap of all four patches: duplicates
    (100, 700, 300, 900, 1),    # cut by y = 200 and y = 800
    (550, 750, 850, 850, 2),    # cut in both directions (four fragments)
    (700, 500, 790, 560, 1),    # touches the next one, same class: must stay apart
    (790, 500, 850, 560, 1),
    (100, 0, 1300, 40, 2),      # spans the whole width, on the scene edge
    (1200, 900, 1300, 1000, 1),  # bottom-right scene corner
]


def _rect(x1: int, y1: int, x2: int, y2: int) -> list[list[float]]:
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def _patch_gt_as_predictions(split_json: Path) -> tuple[dict, list[dict]]:
    coco = json.loads(split_json.read_text())
    images = {im["id"]: im for im in coco["images"]}
    preds = []
    for ann in coco["annotations"]:
        im = images[ann["image_id"]]
        rle = segmentation_to_rle(ann["segmentation"], im["height"], im["width"])
        preds.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0,
                      "bbox": ann["bbox"], "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    return coco, preds


def _match(scenes: dict, results: list[dict]) -> tuple[list[float], list[int]]:
    """Best mask IoU per original instance, and how many merged results reach 0.9 with it."""
    best, hits = [], []
    for scene in scenes["images"]:
        h, w = scene["height"], scene["width"]
        gts = [a for a in scenes["annotations"] if a["image_id"] == scene["id"]]
        dts = [r for r in results if r["image_id"] == scene["id"]]
        if not gts:
            continue
        gt_rles = [segmentation_to_rle(a["segmentation"], h, w) for a in gts]
        dt_rles = [segmentation_to_rle(r["segmentation"], h, w) for r in dts]
        iou = np.asarray(mask_utils.iou(dt_rles, gt_rles, [0] * len(gt_rles))).reshape(len(dts), len(gts))
        same_class = np.array([[d["category_id"] == g["category_id"] for g in gts] for d in dts]).reshape(iou.shape)
        iou = np.where(same_class, iou, 0.0)
        best += iou.max(axis=0).tolist() if len(dts) else [0.0] * len(gts)
        hits += (iou >= 0.9).sum(axis=0).tolist()
    return best, hits


def test_make_item_equals_full_canvas() -> None:
    rng = np.random.default_rng(1)
    mask = np.zeros((60, 80), dtype=np.uint8)
    mask[5:50, 10:70] = rng.random((45, 60)) > 0.7
    canvas = np.zeros((200, 300), dtype=np.uint8)
    canvas[100:160, 220:300] = mask
    item = make_item(mask, 220, 100, (200, 300), source=1, category_id=1, score=0.5, window=(200, 80, 100, 120))
    assert np.array_equal(mask_utils.decode(item.rle), canvas)
    assert item.box == (230, 105, 60, 45) and item.area == float(mask.sum())
    assert make_item(np.zeros((5, 5), np.uint8), 0, 0, (10, 10), source=1, category_id=1, score=0.5,
                     window=(0, 0, 10, 10)) is None


def test_round_trip_rectangles(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "scene.png")
    anns = [{"id": i + 1, "image_id": 3, "category_id": c, "iscrowd": 0, "segmentation": _rect(x1, y1, x2, y2),
             "area": float((x2 - x1) * (y2 - y1)), "bbox": [x1, y1, x2 - x1, y2 - y1]}
            for i, (x1, y1, x2, y2, c) in enumerate(RECTS)]
    scenes = {"images": [{"id": 3, "file_name": "scene.png", "height": H, "width": W}], "annotations": anns,
              "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (tmp_path / "scene.json").write_text(json.dumps(scenes))
    split_coco(tmp_path / "scene.json", tmp_path, tmp_path / "split", size=800, overlap=200, progress=False)
    coco, preds = _patch_gt_as_predictions(tmp_path / "split" / "annotations" / "instances.json")
    stats: dict[str, int] = {}
    results, images = merge_predictions(preds, coco, stats=stats)
    assert images == [{"id": 3, "file_name": "scene.png", "height": H, "width": W}]
    assert stats["fused"] > 0 and stats["suppressed"] > 0
    best, hits = _match(scenes, results)
    assert min(best) >= 0.9, best
    assert hits == [1] * len(RECTS)
    assert len(results) == len(RECTS)

    (tmp_path / "preds.json").write_text(json.dumps(preds))
    args = argparse.ArgumentParser()
    data_merge.add_arguments(args)
    ns = args.parse_args(["--patches", str(tmp_path / "split" / "annotations" / "instances.json"),
                          "--predictions", str(tmp_path / "preds.json"), "--out", str(tmp_path / "merged")])
    assert data_merge.run(ns) == 0
    assert len(json.loads((tmp_path / "merged" / "scene_predictions.json").read_text())) == len(RECTS)
    assert json.loads((tmp_path / "merged" / "scene_images.json").read_text()) == images


def test_round_trip_isaid_samples(tmp_path: Path) -> None:
    if not ISAID.is_dir():
        pytest.skip("iSAID samples not available")
    from rsiseg.data.converters.isaid import convert_isaid

    convert_isaid(ISAID, tmp_path / "coco", progress=False)
    scene_json = tmp_path / "coco" / "annotations" / "instances.json"
    split_coco(scene_json, ISAID, tmp_path / "split", size=512, overlap=128, progress=False)
    coco, preds = _patch_gt_as_predictions(tmp_path / "split" / "annotations" / "instances.json")
    scenes = json.loads(scene_json.read_text())
    stats: dict[str, int] = {}
    results, _ = merge_predictions(preds, coco, scene_images=scenes["images"], stats=stats)
    best, hits = _match(scenes, results)
    matched = float(np.mean(np.array(best) >= 0.9))
    print(f"iSAID round trip: {len(best)} instances, {matched:.4f} matched at IoU >= 0.9, "
          f"min IoU {min(best):.4f}, merged {len(results)}, stats {stats}")
    assert min(best) >= 0.9
    assert hits == [1] * len(best)  # exactly one merged instance per original


def test_merge_command_refuses_non_finite_predictions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rsiseg.cli import main

    patches = tmp_path / "patches.json"
    patches.write_text(json.dumps({"images": [{"id": 1, "file_name": "p.png", "height": 8, "width": 8,
                                               "scene_id": 5, "scene_file": "s.png", "offset": [0, 0]}],
                                   "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    predictions = tmp_path / "preds.json"
    predictions.write_text('[{"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [0, 0, NaN, 2],'
                           ' "segmentation": [[0, 0, 4, 0, 4, 4]]}]')
    out = tmp_path / "out"
    assert main(["-q", "data", "merge", "--patches", str(patches), "--predictions", str(predictions),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "preds.json" in err and "result #0" in err and "non-finite" in err
    assert not out.exists()


def test_masks_sharing_no_pixel_never_suppress_each_other() -> None:
    """Even at thresholds of 0: a fused L-shaped item's box may cover another item, not its mask."""
    from rsiseg.data.merge import merge_scene_items

    ell = np.zeros((100, 100), dtype=bool)
    ell[:, :20] = ell[80:, :] = True  # an L: its box holds the square below
    square = np.ones((30, 30), dtype=bool)
    window = (0, 0, 200, 200)
    items = [make_item(ell, 0, 0, (200, 200), source=0, category_id=1, score=0.9, window=window),
             make_item(square, 40, 20, (200, 200), source=1, category_id=1, score=0.8, window=window),
             make_item(square, 10, 10, (200, 200), source=1, category_id=1, score=0.7, window=window)]
    kept = merge_scene_items(items, 200, 200, policy="suppress", iou_threshold=0.0, ios_threshold=0.0)
    assert sorted(it.score for it in kept) == [0.8, 0.9]  # the square in the L's box stays; the overlapping one goes
