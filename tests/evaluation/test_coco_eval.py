"""COCO evaluation: cross-checked against pycocotools, plus presets, edge cases and output helpers."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math

import numpy as np
import pytest
from pycocotools.coco import COCO as PyCOCO
from pycocotools.cocoeval import COCOeval as PyCOCOeval

from rsiseg.evaluation.coco import (
    PRESETS,
    evaluate_coco,
    format_metrics_table,
    stat_names,
)
from rsiseg.evaluation.metrics import metric_value, write_metrics
from rsiseg.structures import mask_to_rle, rle_area, rle_to_xywh, segmentation_to_rle

SIZE = 800  # big enough for an object above the iSAID "large" bound of 512^2 px
CATEGORIES = [{"id": 1, "name": "plane"}, {"id": 2, "name": "storage_tank"}, {"id": 3, "name": "ship"}]
# Polygon radii chosen to land in different COCO and iSAID area bins:
# 10 -> small/small, 35 -> medium/small, 80 -> large/small, 150 -> large/medium, 420 -> large/large.
LAYOUT = {  # image id -> [(category id, radius), ...]; image 4 has no annotations
    1: [(1, 10), (1, 35), (2, 80), (2, 10), (1, 150), (2, 35)],
    2: [(1, 420), (2, 10), (2, 10), (1, 35)],
    3: [(2, 420), (2, 150), (1, 80), (1, 10), (2, 35), (1, 35)],
    4: [],
}


def _polygon(rng: np.random.Generator, cx: float, cy: float, r: float) -> list[float]:
    """A star-shaped 10-gon, so that its mask differs clearly from its box."""
    angles = np.linspace(0, 2 * np.pi, 10, endpoint=False)
    radii = r * rng.uniform(0.6, 1.0, size=10)
    xs = np.clip(cx + radii * np.cos(angles), 0, SIZE - 1)
    ys = np.clip(cy + radii * np.sin(angles), 0, SIZE - 1)
    return np.stack([xs, ys], 1).ravel().round(2).tolist()


def _instance(poly: list[float]) -> dict:
    """RLE (str counts), tight box and area of one polygon."""
    rle = segmentation_to_rle([poly], SIZE, SIZE)
    rle = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return {"segmentation": rle, "bbox": rle_to_xywh(rle), "area": rle_area(rle)}


def _random_center(rng: np.random.Generator, r: float) -> tuple[float, float]:
    lo, hi = min(r, SIZE / 2), max(SIZE - r, SIZE / 2)
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _make_synthetic() -> tuple[dict, list[dict]]:
    """Ground truth over 4 images (one empty) and jittered, incomplete, partly wrong detections."""
    rng = np.random.default_rng(0)
    images = [{"id": i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE} for i in LAYOUT]
    annotations, results = [], []
    for image_id, objects in LAYOUT.items():
        for cat_id, r in objects:
            cx, cy = _random_center(rng, r)
            gt_poly = _polygon(rng, cx, cy, r)
            inst = _instance(gt_poly)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id,
                                "segmentation": [gt_poly], "bbox": inst["bbox"], "area": inst["area"],
                                "iscrowd": 0})
            if r < 300 and rng.uniform() < 0.15:  # missed object (never the rare large ones)
                continue
            shift = rng.normal(0, 0.08 * r, 2)
            pts = np.asarray(gt_poly).reshape(-1, 2) + rng.normal(0, 0.1 * r, size=(10, 2)) + shift
            det = _instance(np.clip(pts, 0, SIZE - 1).ravel().tolist())
            x, y, w, h = det["bbox"]
            box = [x + rng.normal(0, 0.05 * w), y + rng.normal(0, 0.05 * h),
                   w * rng.uniform(0.85, 1.15), h * rng.uniform(0.85, 1.15)]
            results.append({"image_id": image_id, "category_id": cat_id, "bbox": box,
                            "score": float(rng.uniform(0.3, 1.0)), "segmentation": det["segmentation"]})
            if rng.uniform() < 0.3:  # same object, wrong class
                wrong = {"category_id": 3 - cat_id, "score": float(rng.uniform(0, 0.5))}
                results.append({**results[-1], **wrong})
    # False positives everywhere, including the empty image and the class without ground truth.
    for _ in range(12):
        r = float(rng.choice([10, 35, 80, 150]))
        det = _instance(_polygon(rng, *_random_center(rng, r), r))
        results.append({"image_id": int(rng.integers(1, 5)), "category_id": int(rng.integers(1, 4)),
                        "bbox": det["bbox"], "score": float(rng.uniform(0, 1)),
                        "segmentation": det["segmentation"]})
    gt = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    return gt, results


@pytest.fixture(scope="module")
def synthetic() -> tuple[dict, list[dict]]:
    return _make_synthetic()


def _pycoco_eval(gt: dict, results: list[dict], iou_type: str, preset: str, cat_ids: list[int] | None = None):
    """Reference pycocotools run (evaluate + accumulate) with the preset's parameters."""
    coco_gt = PyCOCO()
    coco_gt.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = PyCOCOeval(coco_gt, coco_dt, iou_type)
        ev.params.maxDets = list(PRESETS[preset].max_dets)
        ev.params.areaRng = [[0, 1e5**2], *[list(r) for r in PRESETS[preset].area_ranges]]
        ev.params.areaRngLbl = ["all", "small", "medium", "large"]
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
    return ev


def _stats_from_arrays(ev) -> np.ndarray:
    """The 12 statistics computed from pycocotools' accumulated arrays.

    pycocotools' summarize() computes stats[0] with a hardcoded maxDets=100, which gives -1 when
    maxDets is (1, 10, 1000); here every AP line uses maxDets[-1], as summarize does elsewhere.
    """
    precision, recall = ev.eval["precision"], ev.eval["recall"]  # [T,R,K,A,M], [T,K,A,M]
    iou = {None: slice(None), 0.5: [0], 0.75: [5]}

    def mean(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(valid.mean()) if valid.size else -1.0

    ap = [mean(precision[iou[t], :, :, 0, -1]) for t in (None, 0.5, 0.75)]
    ap += [mean(precision[:, :, :, a, -1]) for a in (1, 2, 3)]
    ar = [mean(recall[:, :, 0, m]) for m in (0, 1, 2)] + [mean(recall[:, :, a, -1]) for a in (1, 2, 3)]
    return np.array(ap + ar)


def _as_array(stats: dict, preset: str) -> np.ndarray:
    names = stat_names(PRESETS[preset].max_dets)
    return np.array([-1.0 if stats[n] is None else stats[n] for n in names])


@pytest.fixture(scope="module")
def metrics_by_preset(synthetic) -> dict[str, dict]:
    gt, results = synthetic
    return {preset: evaluate_coco(gt, results, preset=preset) for preset in PRESETS}


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("preset", ["coco", "isaid"])
def test_matches_pycocotools(synthetic, metrics_by_preset, preset, iou_type):
    gt, results = synthetic
    ours = _as_array(metrics_by_preset[preset][iou_type], preset)
    ev = _pycoco_eval(gt, results, iou_type, preset)
    reference = _stats_from_arrays(ev)
    if preset == "coco":
        # With standard maxDets pycocotools' own summary is the reference, which also
        # validates _stats_from_arrays for the iSAID case.
        with contextlib.redirect_stdout(io.StringIO()):
            ev.summarize()
        np.testing.assert_allclose(reference, ev.stats, atol=1e-12)
    np.testing.assert_allclose(ours, reference, atol=1e-6, rtol=0)
    # The data must exercise the comparison: every bin populated, scores far from trivial.
    assert np.all(reference > 0) and reference[0] < 0.95


def test_presets_use_their_own_area_ranges(metrics_by_preset):
    coco, isaid = metrics_by_preset["coco"]["segm"], metrics_by_preset["isaid"]["segm"]
    assert "AR@100" in coco and "AR@1000" in isaid
    # The AP over all areas does not depend on the bins (under 100 detections per image)...
    assert coco["AP"] == pytest.approx(isaid["AP"], abs=1e-12)
    # ...but the per-bin figures do.
    assert coco["APs"] != pytest.approx(isaid["APs"], abs=1e-6)


def test_area_ranges_move_an_object_between_bins():
    """A 120x120 px object is COCO-large but iSAID-small."""
    gt = {"images": [{"id": 1, "height": 200, "width": 200}], "categories": CATEGORIES[:1],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 120, 120],
                           "area": 14400.0, "iscrowd": 0}]}
    results = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 120, 120], "score": 1.0}]
    coco = evaluate_coco(gt, results, iou_types=["bbox"], preset="coco")["bbox"]
    isaid = evaluate_coco(gt, results, iou_types=["bbox"], preset="isaid")["bbox"]
    assert (coco["APs"], coco["APl"]) == (None, 1.0)
    assert (isaid["APs"], isaid["APl"]) == (1.0, None)


def test_perfect_predictions_give_ap_one(synthetic):
    gt, _ = synthetic
    results = []
    for ann in gt["annotations"]:
        inst = _instance(ann["segmentation"][0])
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "bbox": ann["bbox"], "score": 1.0, "segmentation": inst["segmentation"]})
    metrics = evaluate_coco(gt, results)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == 1.0
        assert metrics[iou_type]["AR@100"] == 1.0
        assert metrics[iou_type]["per_class"] == {"plane": 1.0, "storage_tank": 1.0, "ship": None}


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_per_class_ap_matches_single_category_runs(synthetic, metrics_by_preset, iou_type):
    gt, results = synthetic
    ours = metrics_by_preset["coco"][iou_type]
    for cat in CATEGORIES:
        ev = _pycoco_eval(gt, results, iou_type, "coco", cat_ids=[cat["id"]])
        with contextlib.redirect_stdout(io.StringIO()):
            ev.summarize()
        expected_ap = None if ev.stats[0] < 0 else ev.stats[0]
        expected_ap50 = None if ev.stats[1] < 0 else ev.stats[1]
        assert ours["per_class"][cat["name"]] == pytest.approx(expected_ap, abs=1e-6)
        assert ours["per_class_AP50"][cat["name"]] == pytest.approx(expected_ap50, abs=1e-6)
    # "ship" has detections but no ground truth: undefined, not zero.
    assert ours["per_class"]["ship"] is None
    assert 0 < ours["per_class"]["plane"] < 1 and 0 < ours["per_class"]["storage_tank"] < 1


def test_empty_results_give_zeros_and_warn(synthetic, caplog):
    gt, _ = synthetic
    with caplog.at_level(logging.WARNING, logger="rsiseg.evaluation.coco"):
        metrics = evaluate_coco(gt, [])
    assert "no detections" in caplog.text
    for iou_type in ("bbox", "segm"):
        stats = metrics[iou_type]
        assert all(stats[name] == 0.0 for name in stat_names((1, 10, 100)))
        assert stats["per_class"] == {"plane": 0.0, "storage_tank": 0.0, "ship": None}


def _grid_of_150() -> tuple[dict, list[dict]]:
    """One image with 150 small boxes, each detected exactly."""
    boxes = [[20.0 * (i % 15), 20.0 * (i // 15), 16.0, 16.0] for i in range(150)]
    gt = {"images": [{"id": 1, "height": 300, "width": 300}], "categories": CATEGORIES[:1],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 256.0,
                           "iscrowd": 0} for i, b in enumerate(boxes)]}
    results = [
        {"image_id": 1, "category_id": 1, "bbox": b, "score": 1.0 - i / 1000} for i, b in enumerate(boxes)
    ]
    return gt, results


def test_max_dets_cap_is_applied():
    gt, results = _grid_of_150()
    coco = evaluate_coco(gt, results, iou_types=["bbox"], preset="coco")["bbox"]
    # Only the top 100 count: precision 1 up to recall 2/3, i.e. 67 of the 101 recall points.
    assert coco["AP"] == pytest.approx(67 / 101, abs=1e-12)
    assert coco["AR@100"] == pytest.approx(100 / 150, abs=1e-12)
    isaid = evaluate_coco(gt, results, iou_types=["bbox"], preset="isaid")["bbox"]
    assert isaid["AP"] == 1.0 and isaid["AR@1000"] == 1.0
    custom = evaluate_coco(gt, results, iou_types=["bbox"], max_dets=(1, 10, 120))["bbox"]
    assert custom["AR@120"] == pytest.approx(120 / 150, abs=1e-12)
    assert custom["AR@10"] == pytest.approx(10 / 150, abs=1e-12)


def test_inputs_are_not_modified_and_gt_path_works(synthetic, metrics_by_preset, tmp_path):
    gt, results = synthetic
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    bbox_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    evaluate_coco(gt, bbox_only, iou_types=["bbox"])
    evaluate_coco(gt, results, preset="isaid")
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    from_path = evaluate_coco(path, results)
    assert gt == gt_before and results == results_before
    assert from_path == metrics_by_preset["coco"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"category_id": 7}, "category_id 7"),
        ({"image_id": 99}, "image_id 99"),
        ({"segmentation": None}, "lacks ['segmentation']"),
    ],
)
def test_bad_results_raise_clear_errors(synthetic, change, message):
    gt, results = synthetic
    bad = {**results[0], **change}
    if change.get("segmentation", 0) is None:
        del bad["segmentation"]
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        evaluate_coco(gt, [bad])


def test_bad_arguments_raise():
    gt, results = _grid_of_150()
    with pytest.raises(ValueError, match="preset"):
        evaluate_coco(gt, results, preset="voc")
    with pytest.raises(ValueError, match="max_dets"):
        evaluate_coco(gt, results, iou_types=["bbox"], max_dets=(1, 100, 10))
    with pytest.raises(ValueError, match="iou_types"):
        evaluate_coco(gt, results, iou_types=["keypoints"])


def test_metric_value(metrics_by_preset):
    metrics = metrics_by_preset["coco"]
    assert metric_value(metrics, "bbox/AP") == metrics["bbox"]["AP"]
    assert metric_value(metrics, "segm/AP50") == metrics["segm"]["AP50"]
    undefined = {"bbox": {**metrics["bbox"], "APl": None}}
    assert math.isnan(metric_value(undefined, "bbox/APl"))
    for name in ("bbox/mAP", "AP", "bbox/per_class", "keypoints/AP"):
        with pytest.raises(ValueError, match="valid names: .*bbox/AP, bbox/AP50"):
            metric_value(metrics, name)


def test_format_and_write_metrics(metrics_by_preset, tmp_path):
    metrics = copy.deepcopy(metrics_by_preset["coco"])
    metrics["bbox"]["AP"] = 0.4567
    table = format_metrics_table(metrics)
    lines = table.splitlines()
    assert lines[0].split("|")[1:-1] == [" type ", " AP ", " AP50 ", " AP75 ", " APs ", " APm ", " APl "]
    bbox_row = next(line for line in lines if line.startswith("| bbox |"))
    assert bbox_row.split("|")[2].strip() == "45.7"
    assert any(line.startswith("| segm |") for line in lines)
    assert "| class | bbox AP | segm AP |" in table
    assert "| ship | - | - |" in table  # undefined per-class AP
    plane_ap = f"{100 * metrics['segm']['per_class']['plane']:.1f}"
    assert next(line for line in lines if line.startswith("| plane |")).endswith(f"| {plane_ap} |")

    path = tmp_path / "out" / "metrics.json"
    write_metrics(metrics, path)
    assert json.loads(path.read_text()) == metrics
    assert '"ship": null' in path.read_text()


def test_annotation_id_zero_is_evaluated_like_any_other() -> None:
    """SSDD numbers annotations from 0; the evaluator uses 0 as its 'unmatched' marker."""
    mask = np.zeros((50, 50), np.uint8)
    mask[10:20, 10:30] = 1
    gt = {
        "images": [{"id": 1, "height": 50, "width": 50}],
        "categories": [{"id": 1, "name": "ship"}],
        "annotations": [{"id": 0, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 10], "area": 200,
                         "iscrowd": 0, "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]]}],
    }
    results = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 10], "score": 0.9,
                "segmentation": mask_to_rle(mask)}]
    metrics = evaluate_coco(gt, results)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    assert gt["annotations"][0]["id"] == 0
