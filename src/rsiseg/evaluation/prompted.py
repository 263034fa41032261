"""AP before and after prompting the missed instances ("Insight Any Instance", Table XI).

The protocol: segment a dataset automatically, find the ground-truth instances that the automatic
detections missed, give their ground-truth boxes to the model as box prompts, add the prompted
instances to the automatic results, and report COCO AP before and after. Each image is encoded once
(:func:`~rsiseg.models.layers.box_prompting.encode_images`); the automatic detections
(:func:`~rsiseg.models.layers.box_prompting.detect_encoded`) and the prompts
(:func:`~rsiseg.models.layers.box_prompting.segment_boxes`) share that encoding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.ops import box_iou
from tqdm import tqdm

from rsiseg.config import EvalConfig
from rsiseg.data.coco import CocoInstanceDataset
from rsiseg.data.loader import collate
from rsiseg.evaluation.coco import evaluate_coco
from rsiseg.evaluation.metrics import percent
from rsiseg.inference.export import prediction_to_coco
from rsiseg.models.layers.box_prompting import detect_encoded, encode_images, segment_boxes
from rsiseg.structures import rle_to_xywh


def missed_instances(pred: dict[str, Tensor], gt_boxes: Tensor, gt_labels: Tensor, iou: float = 0.5,
                     score_threshold: float = 0.05) -> Tensor:
    """Which ground-truth instances the automatic detections missed.

    An instance is *found* when at least one detection with ``score >= score_threshold`` and the
    instance's label has a box IoU ``>= iou`` with it, and *missed* otherwise. This is not COCO's
    one-to-one matching: one detection may find several instances. A ground-truth label that the
    model cannot predict (e.g. ``-1``) is always missed.

    Args:
        pred: one image's detections: ``boxes`` float ``[D, 4]`` xyxy, ``labels`` int64 ``[D]``,
            ``scores`` float ``[D]`` (as the model's eval forward gives them), in the ground truth's pixels.
        gt_boxes: float ``[N, 4]`` xyxy ground-truth boxes.
        gt_labels: int64 ``[N]`` their model labels (1..K).
        iou: the box IoU at which a detection finds an instance.
        score_threshold: detections scoring below it are ignored.

    Returns:
        bool ``[N]`` on ``gt_boxes``' device, True where the instance was missed.
    """
    gt_boxes = gt_boxes.reshape(-1, 4).float()
    keep = pred["scores"].to(gt_boxes.device) >= score_threshold
    boxes = pred["boxes"].to(gt_boxes.device).reshape(-1, 4).float()[keep]
    labels = pred["labels"].to(gt_boxes.device)[keep]
    if len(gt_boxes) == 0 or len(boxes) == 0:
        return torch.ones(len(gt_boxes), dtype=torch.bool, device=gt_boxes.device)
    same_label = gt_labels.to(gt_boxes.device)[:, None] == labels[None, :]
    found = ((box_iou(gt_boxes, boxes) >= iou) & same_label).any(dim=1)
    return ~found


def ground_truth(
    dataset: CocoInstanceDataset, image_id: int, category_to_label: dict[int, int],
) -> tuple[Tensor, Tensor]:
    """An image's non-crowd ground truth from the dataset's checked COCO index, in the image's own pixels.

    Returns:
        ``(boxes float [N, 4] xyxy, labels int64 [N])``; a category the model does not predict gets label -1.
    """
    anns = [a for a in dataset.index.anns_by_image.get(image_id, []) if not a.get("iscrowd")]
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                         dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([category_to_label.get(a["category_id"], -1) for a in anns], dtype=torch.int64)
    return boxes, labels


@torch.no_grad()
def evaluate_with_missed_prompts(
    model: nn.Module, dataset: CocoInstanceDataset, eval_cfg: EvalConfig, device: torch.device,
    iou: float = 0.5, score_threshold: float = 0.05, progress: bool = True,
    label_to_category: list[int] | None = None, num_workers: int = 0,
) -> dict[str, Any]:
    """COCO metrics of the automatic results and of the automatic results plus the prompted missed instances.

    For each image: encode it once, detect automatically, find the missed ground-truth instances
    (:func:`missed_instances` with ``iou`` and ``score_threshold``), prompt the model with their
    ground-truth boxes, and keep each prompted instance with the model's label, score and mask.
    Both result lists are filtered and binarised by ``eval_cfg.score_threshold`` and
    ``eval_cfg.mask_threshold`` and scored as :func:`rsiseg.inference.predictor.evaluate_model`
    scores them; "before" therefore equals its metrics. Note that prompted instances compete
    with the automatic ones for the top ``maxDets`` places by their own scores.

    Args:
        model: an R-CNN of the registry (it must have ``roi_heads``), in eval mode on ``device``.
        dataset: the ground truth and its images (only images are read through the loader).
        label_to_category: the data's category id of each model label (``[i]`` for label ``i + 1``);
            defaults to the dataset's own order.

    Returns:
        ``{"before": metrics, "after": metrics, "instances": non-crowd ground-truth instances,
        "missed": instances prompted, "missed_iou": iou, "missed_score_threshold": score_threshold,
        "prompted_correct_class": prompted instances given their ground-truth class,
        "prompted_empty_masks": prompted instances whose mask came out empty,
        "results_before": automatic result count, "results_after": result count with the prompts}``;
        the metrics as from :func:`rsiseg.evaluation.coco.evaluate_coco`.

    Raises:
        ValueError: the model has no RoI heads to prompt (e.g. a semantic model).
    """
    heads = getattr(model, "roi_heads", None)
    if heads is None or not all(hasattr(heads, name) for name in ("box_class_probs", "mask_probs")):
        raise ValueError(f"prompting missed instances needs an R-CNN instance model with roi_heads; "
                         f"{type(model).__name__} has none to prompt")
    label_to_category = list(label_to_category or dataset.label_to_category)
    category_to_label = {cat: i + 1 for i, cat in enumerate(label_to_category)}
    to_coco = {"label_to_category_id": label_to_category, "score_threshold": eval_cfg.score_threshold,
               "mask_threshold": eval_cfg.mask_threshold}
    before: list[dict[str, Any]] = []
    prompted: list[dict[str, Any]] = []
    instances = missed = correct = empty = 0
    model.eval()
    # A private generator: the loader must not draw on the global RNG (as in iterate_predictions).
    loader = DataLoader(dataset.images_only(), batch_size=eval_cfg.batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate, generator=torch.Generator().manual_seed(0))
    for images, targets in tqdm(loader, desc="predict + prompt missed", disable=not progress, leave=False):
        encoded = encode_images(model, [img.to(device, non_blocking=True) for img in images])
        detections = [{k: v.cpu() for k, v in d.items()} for d in detect_encoded(model, encoded)]
        image_ids = [int(t["image_id"]) for t in targets]
        prompts, prompt_labels = [], []
        for pred, image_id in zip(detections, image_ids):
            boxes, labels = ground_truth(dataset, image_id, category_to_label)
            lost = missed_instances(pred, boxes, labels, iou, score_threshold)
            prompts.append(boxes[lost])
            prompt_labels.append(labels[lost])
            instances += len(boxes)
            missed += int(lost.sum())
            before += prediction_to_coco(pred, image_id, **to_coco)
        if sum(len(p) for p in prompts) == 0:
            continue
        answers = segment_boxes(model, encoded, [p.to(device) for p in prompts])
        for answer, gt_labels, image_id in zip(answers, prompt_labels, image_ids):
            answer = {k: v.cpu() for k, v in answer.items()}
            correct += int((answer["labels"] == gt_labels).sum())
            for entry in prediction_to_coco(answer, image_id, **to_coco):
                # its mask's box, not the ground-truth box it was prompted with (box AP would score the ground truth)
                entry["bbox"] = rle_to_xywh(entry["segmentation"])
                empty += entry["area"] == 0
                prompted.append(entry)

    gt = dataset.index.to_coco()
    settings = {"iou_types": tuple(eval_cfg.iou_types), "preset": eval_cfg.preset,
                "max_dets": tuple(eval_cfg.max_dets) if eval_cfg.max_dets else None}
    return {
        "before": evaluate_coco(gt, before, **settings),
        "after": evaluate_coco(gt, before + prompted, **settings),
        "instances": instances,
        "missed": missed,
        "missed_iou": iou,
        "missed_score_threshold": score_threshold,
        "prompted_correct_class": correct,
        "prompted_empty_masks": empty,
        "results_before": len(before),
        "results_after": len(before) + len(prompted),
    }


def format_prompted_table(report: dict[str, Any]) -> str:
    """A Markdown before/after table (box and mask AP and AP50, in percent) with the instance counts."""
    columns = [("bbox", "AP"), ("bbox", "AP50"), ("segm", "AP"), ("segm", "AP50")]
    names = {"bbox": "box", "segm": "mask"}
    lines = ["| results | " + " | ".join(f"{names[t]} {s}" for t, s in columns) + " |", "|---" * 5 + "|"]
    for row, key in (("automatic", "before"), ("+ prompted missed", "after")):
        cells = [percent(report[key].get(t, {}).get(s)) for t, s in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", f"instances: {report['instances']}, missed (box IoU < {report['missed_iou']:g} with every "
              f"same-class detection scoring >= {report['missed_score_threshold']:g}) and prompted: "
              f"{report['missed']}, prompted with the right class: {report['prompted_correct_class']}, with an empty mask: "
              f"{report['prompted_empty_masks']}; a prompted instance's box is its mask's bounding box"]
    return "\n".join(lines)
