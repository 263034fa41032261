"""Tests of rsiseg.inference.export: predictions to COCO result entries and their JSON file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from rsiseg.inference.export import prediction_to_coco, write_coco_results
from rsiseg.inference.paste import paste_full
from tests.inference.roi_predictions import roi_prediction


def _pred(scores: list[float], labels: list[int], height: int = 24, width: int = 40, masks: bool = True) -> dict:
    """A prediction with distinct boxes and random mask probabilities (non-square, to catch H/W swaps)."""
    n = len(scores)
    gen = torch.Generator().manual_seed(0)
    xy = torch.arange(n, dtype=torch.float32)[:, None] * torch.tensor([2.0, 1.0])
    pred = {
        "boxes": torch.cat([xy, xy + torch.tensor([10.0, 5.0])], dim=1),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "scores": torch.tensor(scores, dtype=torch.float32),
    }
    if masks:
        pred["masks"] = torch.rand((n, 1, height, width), generator=gen)
    return pred


def test_labels_map_through_sequence_and_mapping() -> None:
    pred = _pred([0.9, 0.8, 0.7], [1, 2, 3], masks=False)
    by_sequence = prediction_to_coco(pred, image_id=5, label_to_category_id=[10, 20, 30])
    assert [e["category_id"] for e in by_sequence] == [10, 20, 30]  # label 1 -> first category
    assert all(e["image_id"] == 5 for e in by_sequence)
    by_mapping = prediction_to_coco(pred, image_id=5, label_to_category_id={1: 7, 2: 3, 3: 11})
    assert [e["category_id"] for e in by_mapping] == [7, 3, 11]


@pytest.mark.parametrize("bad_label", [0, 4])
def test_unknown_label_raises_and_names_it(bad_label: int) -> None:
    pred = _pred([0.9, 0.8], [1, bad_label], masks=False)
    with pytest.raises(ValueError, match=rf"\[{bad_label}\]"):
        prediction_to_coco(pred, 1, [10, 20, 30])


def test_score_threshold_and_max_detections_keep_best_sorted() -> None:
    pred = _pred([0.1, 0.9, 0.5, 0.7, 0.3], [1, 2, 1, 2, 1])
    kept = prediction_to_coco(pred, 1, [1, 2], score_threshold=0.3)
    assert [e["score"] for e in kept] == pytest.approx([0.9, 0.7, 0.5, 0.3])
    top2 = prediction_to_coco(pred, 1, [1, 2], score_threshold=0.3, max_detections=2)
    assert [e["score"] for e in top2] == pytest.approx([0.9, 0.7])
    assert [e["category_id"] for e in top2] == [2, 2]
    assert prediction_to_coco(pred, 1, [1, 2], max_detections=0) == []


def test_bbox_is_xywh_and_box_only_entries_have_no_segmentation() -> None:
    pred = {
        "boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0]]),
        "labels": torch.tensor([1]),
        "scores": torch.tensor([0.5]),
    }
    (entry,) = prediction_to_coco(pred, 3, [1])
    assert entry["bbox"] == pytest.approx([10.0, 20.0, 40.0, 60.0])
    assert "segmentation" not in entry
    assert entry["area"] == pytest.approx(40.0 * 60.0)


@pytest.mark.parametrize("mask_dims", [3, 4])
def test_rle_round_trip_equals_binarised_mask(mask_dims: int) -> None:
    # 70 detections (more than one binarisation chunk), some dropped in the middle, so the
    # reordering from mask index to score order is exercised.
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(70, generator=gen).tolist()
    pred = _pred(scores, [1 + i % 2 for i in range(70)], height=24, width=40)
    if mask_dims == 3:
        pred["masks"] = pred["masks"][:, 0]
    entries = prediction_to_coco(pred, 1, [1, 2], score_threshold=0.25, mask_threshold=0.6)
    assert len(entries) == sum(s >= 0.25 for s in scores)
    for entry in entries:
        source = scores.index(entry["score"])
        expected = (pred["masks"].reshape(70, 24, 40)[source] > 0.6).numpy().astype(np.uint8)
        rle = entry["segmentation"]
        assert rle["size"] == [24, 40] and isinstance(rle["counts"], str)
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        np.testing.assert_array_equal(decoded, expected)
        assert entry["area"] == pytest.approx(float(expected.sum()))


def test_empty_prediction_gives_no_entries() -> None:
    empty = {
        "boxes": torch.zeros((0, 4)),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
        "masks": torch.zeros((0, 1, 16, 16)),
    }
    assert prediction_to_coco(empty, 1, [1, 2]) == []
    del empty["masks"]
    assert prediction_to_coco(empty, 1, [1, 2]) == []


def test_mismatched_fields_raise_clear_error() -> None:
    pred = _pred([0.9, 0.8], [1, 1], masks=False)
    pred["scores"] = torch.tensor([0.9])
    with pytest.raises(ValueError, match="disagree"):
        prediction_to_coco(pred, 1, [1])
    pred = _pred([0.9, 0.8], [1, 1])
    pred["masks"] = pred["masks"][:1]
    with pytest.raises(ValueError, match="masks"):
        prediction_to_coco(pred, 1, [1])


def _roi_pred(n: int, height: int = 37, width: int = 53, seed: int = 2) -> dict:
    return roi_prediction(n, height, width, seed=seed)


@pytest.mark.parametrize("roi_dims", [3, 4])
def test_roi_masks_export_equals_export_of_pasted_full_masks(roi_dims: int) -> None:
    # Detections dropped by score and by max_detections, so the score-order gather is exercised.
    pred = _roi_pred(80)
    full = {k: v for k, v in pred.items() if k not in ("roi_masks", "image_size")}
    full["masks"] = paste_full(pred["roi_masks"], pred["boxes"], (37, 53))[:, None]
    if roi_dims == 4:
        pred["roi_masks"] = pred["roi_masks"][:, None]
    kwargs = {"score_threshold": 0.2, "mask_threshold": 0.6, "max_detections": 50}
    entries = prediction_to_coco(pred, 4, [1, 2], **kwargs)
    assert len(entries) == 50 and all(e["segmentation"]["size"] == [37, 53] for e in entries)
    assert entries == prediction_to_coco(full, 4, [1, 2], **kwargs)
    assert any(e["area"] > 0 for e in entries)


def test_roi_masks_take_precedence_over_full_masks() -> None:
    pred = _roi_pred(5)
    expected = prediction_to_coco(pred, 1, [1, 2])
    pred["masks"] = torch.zeros((5, 37, 53))  # would give empty masks if used
    assert prediction_to_coco(pred, 1, [1, 2]) == expected


def test_roi_masks_need_image_size_and_matching_length() -> None:
    pred = _roi_pred(3)
    del pred["image_size"]
    with pytest.raises(ValueError, match="image_size"):
        prediction_to_coco(pred, 1, [1, 2])
    pred = _roi_pred(3)
    pred["roi_masks"] = pred["roi_masks"][:2]
    with pytest.raises(ValueError, match="roi_masks"):
        prediction_to_coco(pred, 1, [1, 2])
    empty = {k: v[:0] if k != "image_size" else v for k, v in _roi_pred(3).items()}
    assert prediction_to_coco(empty, 1, [1, 2]) == []


def test_write_coco_results_is_valid_json_without_leftovers(tmp_path) -> None:
    entries = prediction_to_coco(_pred([0.9, 0.4], [1, 2]), 7, [1, 2])
    path = write_coco_results(entries, tmp_path / "nested" / "dir" / "results.json")
    with open(path, encoding="utf-8") as f:
        loaded = json.load(f)
    assert loaded == entries
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # temp file was renamed away
    write_coco_results([], path)  # overwriting in place works too
    assert json.loads(path.read_text()) == []
