"""Prompting the missed instances (Insight Any Instance, Table XI): the missed rule, before/after AP, the CLI flag."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from rsiseg import cli
from rsiseg.data.coco import CocoInstanceDataset
from rsiseg.evaluation.prompted import evaluate_with_missed_prompts, format_prompted_table, missed_instances
from rsiseg.inference.predictor import LoadedModel, evaluate_model, iterate_predictions, load_model


def detections(boxes: list[list[float]], labels: list[int], scores: list[float]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores)}


def test_missed_instances_rule() -> None:
    gt_boxes = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]], dtype=torch.float32)
    gt_labels = torch.tensor([1, 2, 1, 1])
    pred = detections(
        [[0, 0, 10, 10],    # finds instance 0
         [20, 20, 30, 30],  # exact box of instance 1 but another class
         [40, 40, 50, 60],  # IoU 0.5 with instance 2
         [45, 40, 55, 50],  # IoU 1/3 with instance 2
         [60, 60, 70, 70]],  # exact box of instance 3 with a score below the threshold
        [1, 3, 1, 1, 1], [0.9, 0.9, 0.9, 0.9, 0.01],
    )
    assert missed_instances(pred, gt_boxes, gt_labels).tolist() == [False, True, False, True]
    assert missed_instances(pred, gt_boxes, gt_labels, iou=0.6).tolist() == [False, True, True, True]
    assert missed_instances(pred, gt_boxes, gt_labels, score_threshold=0.0).tolist() == [False, True, False, False]
    assert missed_instances(detections([], [], []), gt_boxes, gt_labels).all()
    assert missed_instances(pred, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)).shape == (0,)


@pytest.fixture(scope="module")
def loaded(untrained_checkpoint: str) -> LoadedModel:
    return load_model(untrained_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def val_set(synth_data: dict[str, Path]) -> CocoInstanceDataset:
    return CocoInstanceDataset(synth_data["val"], synth_data["images"])


def test_before_is_plain_evaluation_and_missed_are_prompted(loaded: LoadedModel, val_set: CocoInstanceDataset,
                                                            synth_data: dict[str, Path]) -> None:
    cfg = loaded.config.eval
    report = evaluate_with_missed_prompts(loaded.model, val_set, cfg, loaded.device, progress=False)
    plain, results = evaluate_model(loaded.model, val_set, cfg, loaded.device, progress=False)
    assert report["before"] == plain
    assert report["results_before"] == len(results)

    # The missed count from the model's own forward and the JSON's ground truth.
    gt = json.loads(Path(synth_data["val"]).read_text())
    label_of = {c["id"]: i + 1 for i, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))}
    missed = instances = 0
    for pred, target, _ in iterate_predictions(loaded.model, val_set.images_only(), loaded.device, progress=False):
        anns = [a for a in gt["annotations"] if a["image_id"] == int(target["image_id"]) and not a.get("iscrowd")]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        labels = torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        missed += int(missed_instances(pred, boxes, labels).sum())
        instances += len(anns)
    assert report["instances"] == instances > 0
    assert report["missed"] == missed > instances // 2  # an untrained model misses most
    assert report["missed_iou"] == 0.5
    assert report["results_before"] < report["results_after"] <= report["results_before"] + missed
    assert 0 <= report["prompted_correct_class"] <= missed
    assert "+ prompted missed" in format_prompted_table(report)


def test_prompting_exact_boxes_raises_ap(loaded: LoadedModel, val_set: CocoInstanceDataset) -> None:
    """With the most frequent ground-truth class made to win every box and masks that fill their boxes, the
    prompted instances are true positives in box AP (the boxes of their masks)."""
    model = copy.deepcopy(loaded.model)
    counts = Counter(a["category_id"] for anns in val_set.index.anns_by_image.values() for a in anns)
    label = val_set.index.category_to_label[counts.most_common(1)[0][0]]
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[label] += 20.0
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(5.0)  # masks that fill their boxes
    report = evaluate_with_missed_prompts(model, val_set, loaded.config.eval, loaded.device, progress=False)
    assert report["missed"] > 0 and report["prompted_correct_class"] > 0 and report["prompted_empty_masks"] == 0
    assert report["after"]["bbox"]["AP50"] > report["before"]["bbox"]["AP50"]  # the boxes of the filled masks


def test_prompted_boxes_are_their_masks_not_the_ground_truth(loaded: LoadedModel, val_set: CocoInstanceDataset,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompted instance scores in box AP with its mask's box: a mask that never comes out adds nothing."""
    from rsiseg.evaluation import prompted

    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(-20.0)  # every prompted mask empty
    scored = []
    monkeypatch.setattr(prompted, "evaluate_coco", lambda gt, results, **kw: scored.append(results) or {})
    report = evaluate_with_missed_prompts(model, val_set, loaded.config.eval, loaded.device, progress=False)
    before, after = scored
    added = after[len(before):]
    assert len(added) == report["missed"] == report["prompted_empty_masks"] > 0
    assert all(entry["bbox"] == [0.0, 0.0, 0.0, 0.0] for entry in added)


def test_a_model_without_roi_heads_is_refused(loaded: LoadedModel, val_set: CocoInstanceDataset) -> None:
    with pytest.raises(ValueError, match="roi_heads"):
        evaluate_with_missed_prompts(nn.Conv2d(3, 2, 1), val_set, loaded.config.eval, loaded.device, progress=False)


def test_cli_prompt_missed(untrained_checkpoint: str, synth_data: dict[str, Path], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ev"
    assert cli.main(["-q", "eval", "--checkpoint", untrained_checkpoint, "--prompt-missed", "--missed-iou", "0.3",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| automatic |" in printed and "| + prompted missed |" in printed
    report = json.loads((out / "missed_prompts.json").read_text())
    assert set(report) >= {"before", "after", "instances", "missed", "missed_iou", "prompted_correct_class"}
    assert report["missed_iou"] == 0.3 and report["instances"] > 0
    assert set(report["before"]) == {"bbox", "segm"} and "box AP50" in (out / "missed_prompts.md").read_text()

    assert cli.main(["-q", "eval", "--predictions", str(out / "missed_prompts.json"), "--data",
                     str(synth_data["val"]), "--prompt-missed"]) == 2
    assert "--prompt-missed prompts a model" in capsys.readouterr().err
