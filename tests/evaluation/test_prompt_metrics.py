"""Scores of the prompted (one point per instance) task on hand-built squares with known IoUs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from rsiseg.evaluation import prompt_metrics as pm
from rsiseg.evaluation.coco import stat_names
from rsiseg.evaluation.metrics import metric_value
from rsiseg.evaluation.prompt_metrics import format_prompt_metrics, prompt_stat_names, prompted_metrics
from rsiseg.structures import mask_to_rle, rle_area, rle_to_xywh, segmentation_to_rle

H, W = 48, 64  # not square, so a transposed size would be caught
CATEGORIES = [{"id": 1, "name": "ship"}, {"id": 2, "name": "plane"}, {"id": 3, "name": "harbor"}]


def _mask(x: int, y: int, w: int, h: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y:y + h, x:x + w] = 1
    return mask


def _segmentation(x: int, y: int, w: int, h: int, kind: str):
    """A ``w x h`` square at ``(x, y)`` as a polygon, a compressed RLE or an uncompressed RLE."""
    if kind == "polygon":
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]
    rle = mask_to_rle(_mask(x, y, w, h))
    if kind == "rle":
        return rle
    mask = _mask(x, y, w, h).ravel(order="F")  # column-major runs, starting with a 0-run
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return {"size": [H, W], "counts": np.diff(np.concatenate([[0], edges, [mask.size]])).tolist()}


def _dataset(squares: list[tuple[int, int, tuple[int, int, int, int]]], kind: str = "rle", crowd: int = 0) -> dict:
    """COCO ground truth of ``(image id, category id, (x, y, w, h))`` squares on images 1 and 2.

    The last ``crowd`` squares are crowd annotations. bbox and area come from the rasterised mask.
    """
    annotations = []
    for i, (image_id, cat_id, square) in enumerate(squares):
        segm = _segmentation(*square, kind)
        rle = segmentation_to_rle(segm, H, W)
        annotations.append({"id": 100 + i, "image_id": image_id, "category_id": cat_id, "segmentation": segm,
                            "bbox": rle_to_xywh(rle), "area": rle_area(rle),
                            "iscrowd": int(i >= len(squares) - crowd)})
    images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2)]
    return {"images": images, "annotations": annotations, "categories": copy.deepcopy(CATEGORIES)}


def _result(gt: dict, ann_id: int, mask: np.ndarray | None = None, score: float = 0.9) -> dict:
    """The answer to the prompt of annotation ``ann_id``: ``mask``, or the annotation's own mask."""
    ann = next(a for a in gt["annotations"] if a["id"] == ann_id)
    rle = mask_to_rle(mask) if mask is not None else segmentation_to_rle(ann["segmentation"], H, W)
    counts = rle["counts"]
    rle = {"size": [H, W], "counts": counts.decode() if isinstance(counts, bytes) else counts}
    return {"image_id": ann["image_id"], "annotation_id": ann_id, "category_id": ann["category_id"],
            "score": score, "segmentation": rle}


SQUARES = [(1, 1, (2, 3, 10, 8)), (1, 2, (20, 20, 12, 12)), (1, 1, (40, 5, 6, 14)), (2, 2, (8, 30, 16, 10))]


@pytest.mark.parametrize("kind", ["polygon", "rle", "uncompressed"])
def test_perfect_masks_score_one_everywhere(kind: str) -> None:
    gt = _dataset(SQUARES + [(2, 1, (40, 30, 10, 10))], kind=kind, crowd=1)  # the crowd one is not prompted
    results = [_result(gt, a["id"], score=s) for a, s in zip(gt["annotations"][:4], (0.9, 0.6, 0.8, 0.7))]
    before = (copy.deepcopy(gt), copy.deepcopy(results))
    metrics = prompted_metrics(gt, results)
    prompt = metrics["prompt"]
    assert prompt["mIoU"] == 1.0 and prompt["IoU@50"] == 1.0 and prompt["IoU@75"] == 1.0
    assert prompt["mean_box_IoU"] == pytest.approx(1.0)
    assert (prompt["instances"], prompt["missing"], prompt["empty_masks"]) == (4, 0, 0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0) and metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert (gt, results) == before  # inputs untouched


def test_overlapping_masks_give_the_exact_iou() -> None:
    gt = _dataset([(1, 1, (10, 10, 10, 10)), (1, 1, (30, 10, 10, 10))])
    results = [
        _result(gt, 100, _mask(15, 10, 10, 10)),  # shifted by half: 50 / 150 in mask and box
        _result(gt, 101, _mask(30, 10, 5, 10)),  # its left half: 50 / 100
    ]
    prompt = prompted_metrics(gt, results)["prompt"]
    assert prompt["mIoU"] == pytest.approx((1 / 3 + 1 / 2) / 2, abs=1e-12)
    assert prompt["mean_box_IoU"] == pytest.approx((1 / 3 + 1 / 2) / 2, abs=1e-12)
    assert prompt["IoU@50"] == 0.5  # 0.5 itself counts
    assert prompt["IoU@75"] == 0.0


def test_iou_against_polygon_ground_truth_matches_the_rasterised_mask() -> None:
    gt = _dataset([(1, 1, (10, 10, 10, 10))], kind="polygon")
    gt_mask = mask_utils.decode(segmentation_to_rle(gt["annotations"][0]["segmentation"], H, W))
    pred = gt_mask.copy()
    pred[:, 15:] = 0
    prompt = prompted_metrics(gt, [_result(gt, 100, pred)])["prompt"]
    assert prompt["mIoU"] == pytest.approx(pred.sum() / gt_mask.sum(), abs=1e-12)


def test_missing_result_counts_as_zero() -> None:
    gt = _dataset(SQUARES[:3])
    prompt = prompted_metrics(gt, [_result(gt, 100), _result(gt, 102)])["prompt"]
    assert (prompt["instances"], prompt["missing"]) == (3, 1)
    assert prompt["mIoU"] == pytest.approx(2 / 3)
    assert prompt["IoU@50"] == pytest.approx(2 / 3)
    assert prompt["mean_box_IoU"] == pytest.approx(2 / 3)


def test_empty_mask_is_counted_and_gets_no_box(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {}

    def spy(gt, results, iou_types, preset, max_dets):
        calls[iou_types[0]] = results
        return real(gt, results, iou_types, preset, max_dets)

    real = pm.evaluate_coco
    monkeypatch.setattr(pm, "evaluate_coco", spy)
    gt = _dataset(SQUARES[:2])
    empty = np.zeros((H, W), dtype=np.uint8)
    metrics = prompted_metrics(gt, [_result(gt, 100, empty, score=0.95), _result(gt, 101, score=0.5)])
    assert metrics["prompt"]["empty_masks"] == 1 and metrics["prompt"]["missing"] == 0
    assert metrics["prompt"]["mIoU"] == pytest.approx(0.5) and metrics["prompt"]["mean_box_IoU"] == pytest.approx(0.5)
    assert len(calls["segm"]) == 2 and len(calls["bbox"]) == 1  # the empty mask stays a (wrong) segm result
    assert set(calls["bbox"][0]) == {"image_id", "category_id", "score", "bbox"}
    assert set(calls["segm"][0]) == {"image_id", "category_id", "score", "segmentation"}
    assert metrics["bbox"]["AR@100"] == pytest.approx(0.5) and metrics["segm"]["AR@100"] == pytest.approx(0.5)


def test_per_class_miou() -> None:
    gt = _dataset([(1, 1, (2, 2, 10, 10)), (1, 2, (20, 2, 10, 10)), (2, 2, (20, 20, 10, 10))])
    results = [_result(gt, 100), _result(gt, 101, _mask(20, 2, 5, 10)), _result(gt, 102)]
    prompt = prompted_metrics(gt, results)["prompt"]
    assert prompt["per_class_mIoU"] == {"ship": 1.0, "plane": pytest.approx(0.75), "harbor": None}
    assert prompt["mIoU"] == pytest.approx(2.5 / 3)


def test_no_instances_is_undefined() -> None:
    gt = _dataset([(1, 1, (2, 2, 10, 10))], crowd=1)
    prompt = prompted_metrics(gt, [])["prompt"]
    assert prompt["instances"] == 0 and prompt["missing"] == 0
    assert all(prompt[s] is None for s in pm.PROMPT_STATS)


def _bad(gt: dict, case: str) -> list[dict]:
    good = [_result(gt, 100), _result(gt, 101)]
    if case == "unknown annotation":
        good[1]["annotation_id"] = 999
    elif case == "prompted twice":
        good[1] = _result(gt, 100)
    elif case == "crowd annotation":
        good[1] = _result(gt, 102)
    elif case == "wrong size":
        good[1]["segmentation"] = mask_to_rle(np.zeros((W, H), dtype=np.uint8))
    elif case == "polygon answer":
        good[1]["segmentation"] = [[0, 0, 5, 0, 5, 5]]
    elif case == "score above 1":
        good[1]["score"] = 1.5
    elif case == "no score":
        del good[1]["score"]
    elif case == "other image":
        good[1]["image_id"] = 2
    elif case == "unknown category":
        good[1]["category_id"] = 7
    return good


@pytest.mark.parametrize("case, field", [
    ("unknown annotation", "annotation_id"), ("prompted twice", "annotation_id"),
    ("crowd annotation", "annotation_id"), ("wrong size", "segmentation"), ("polygon answer", "segmentation"),
    ("score above 1", "score"), ("no score", "score"), ("other image", "image_id"),
    ("unknown category", "category_id"),
])
def test_bad_results_name_index_and_field(case: str, field: str) -> None:
    gt = _dataset(SQUARES[:3], crowd=1)
    with pytest.raises(ValueError, match=rf"result #1 .*{field}"):
        prompted_metrics(gt, _bad(gt, case))


def test_bad_ground_truth_names_the_annotation() -> None:
    gt = _dataset(SQUARES[:2])
    results = [_result(gt, 100), _result(gt, 101)]
    gt["annotations"][1]["segmentation"] = {"size": [W, H], "counts": "abc"}
    with pytest.raises(ValueError, match="annotation 101 has a bad segmentation"):
        prompted_metrics(gt, results)


def test_stat_names_resolve_and_table_shows_percents() -> None:
    gt = _dataset([(1, 1, (10, 10, 10, 10)), (1, 2, (30, 10, 10, 10))])
    metrics = prompted_metrics(gt, [_result(gt, 100), _result(gt, 101, _mask(30, 10, 5, 10))], preset="isaid")
    names = prompt_stat_names((1, 10, 1000))
    assert names[:4] == ["prompt/mIoU", "prompt/IoU@50", "prompt/IoU@75", "prompt/mean_box_IoU"]
    assert names[4:] == [f"{g}/{s}" for g in ("segm", "bbox") for s in stat_names((1, 10, 1000))]
    assert "bbox/AR@1000" in names
    assert all(isinstance(metric_value(metrics, name), float) for name in names)

    table = format_prompt_metrics(metrics)
    assert "| prompt | 75.0 | 100.0 | 50.0 | 75.0 |" in table
    assert "| segm |" in table and "| bbox |" in table and "| plane | 50.0 |" in table
