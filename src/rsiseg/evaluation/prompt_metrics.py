"""Scores of the ``prompted`` task (PointSAM): one point prompt per ground-truth instance, one mask back.

Every non-crowd ground-truth instance is prompted once; the model answers with one mask and its
predicted IoU, which serves as the detection score. Three groups are reported::

    {
        "prompt": {
            "mIoU": 0.71,            # mean mask IoU of each answer with its own instance
            "IoU@50": 0.83,          # share of instances answered with mask IoU >= 0.5
            "IoU@75": 0.52,          # ... >= 0.75
            "mean_box_IoU": 0.74,    # mean IoU of the answer's tight box with the instance's box
            "instances": 120,        # non-crowd ground-truth instances
            "missing": 0,            # of them, those without an answer (scored as IoU 0)
            "empty_masks": 2,        # answers whose mask has no pixel
            "per_class_mIoU": {"plane": 0.78, ...},
        },
        "segm": {...},  # COCO mask AP of the answers, from rsiseg.evaluation.coco.evaluate_coco
        "bbox": {...},  # COCO box AP of the answers' tight boxes ("point to box")
    }

Values are fractions in [0, 1], ``None`` where undefined (no instance, or no instance of a class).
The box metrics follow the PointSAM paper's use of a point-prompted mask as a horizontal box detector.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from rsiseg.evaluation.coco import evaluate_coco, format_metrics_table, stat_names
from rsiseg.evaluation.metrics import percent
from rsiseg.structures import rle_area, rle_problem, rle_to_xywh, segmentation_to_rle

PROMPT_STATS = ("mIoU", "IoU@50", "IoU@75", "mean_box_IoU")
_RESULT_KEYS = ("image_id", "annotation_id", "category_id", "score", "segmentation")


def prompted_metrics(
    gt: dict[str, Any],
    results: list[dict[str, Any]],
    preset: str = "coco",
    max_dets: tuple[int, int, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-prompt mask IoU and box IoU, plus COCO mask AP and point-to-box AP, of point-prompted masks.

    ``mIoU``, ``IoU@50``, ``IoU@75`` and ``mean_box_IoU`` average over every non-crowd ground-truth
    instance: an instance with no result (counted in ``missing``) scores IoU 0 in all four, so
    leaving out hard prompts cannot raise them. An empty predicted mask also scores 0; it stays in the
    ``segm`` evaluation (a false positive) but has no box, so it gets no ``bbox`` result. The mask IoU
    is ``pycocotools.mask.iou`` with ``iscrowd=0``; the box IoU compares the predicted mask's tight
    ``xywh`` box with the annotation's ``bbox`` (the box COCO box AP matches against). Per-class mIoU
    groups instances by their ground-truth category, whatever ``category_id`` the result carries.
    The AP groups rank results by ``score``, and keep the top ``maxDets[-1]`` per image: use the
    ``isaid`` preset (1000) for scenes with more than 100 instances.

    Args:
        gt: a COCO instances dataset dict: ``images`` (``id``, ``height``, ``width``), ``annotations``
            (``id``, ``image_id``, ``category_id``, ``segmentation`` as polygons or RLE, ``bbox`` as
            ``xywh`` in absolute pixels, ``area``, ``iscrowd``) and ``categories`` (``id``, ``name``).
            Crowd annotations are not prompted. It is not modified.
        results: one dict per prompted instance: ``image_id``, ``annotation_id`` (the annotation the
            prompt came from), ``category_id``, ``score`` (the predicted IoU, a float in [0, 1]) and
            ``segmentation``, the predicted mask as a COCO RLE (``counts`` a str, bytes or, uncompressed,
            a list) of the full ``[H, W]`` image. A ``bbox`` key is ignored: the box is the mask's.
        preset: a key of :data:`rsiseg.evaluation.coco.PRESETS` (``"coco"`` or ``"isaid"``).
        max_dets: three increasing per-image caps overriding the preset's.

    Returns:
        ``{"prompt": {...}, "segm": {...}, "bbox": {...}}`` as in the module docstring; ``segm`` and
        ``bbox`` as :func:`rsiseg.evaluation.coco.evaluate_coco` returns them.

    Raises:
        ValueError: a malformed ground truth (naming the image or annotation), or a result that lacks a
            key, has a score outside [0, 1], names an unknown, crowd or already prompted
            ``annotation_id``, an ``image_id`` other than its annotation's, an unknown ``category_id``,
            or a ``segmentation`` that is not an RLE of its image's size (naming the result and field).
    """
    sizes, prompted = _index_gt(gt)
    category_ids = {cat["id"] for cat in gt["categories"]}
    mask_iou = dict.fromkeys(prompted, 0.0)
    box_iou = dict.fromkeys(prompted, 0.0)
    segm_results, bbox_results = [], []
    seen: dict[Any, int] = {}
    for i, res in enumerate(results):
        ann = _check_result(i, res, prompted, sizes, category_ids, seen)
        height, width = sizes[ann["image_id"]]
        pred = segmentation_to_rle(res["segmentation"], height, width)
        truth = _gt_rle(ann, height, width)
        mask_iou[ann["id"]] = float(mask_utils.iou([pred], [truth], [0])[0, 0])
        entry = {"image_id": res["image_id"], "category_id": res["category_id"], "score": float(res["score"])}
        segm_results.append({**entry, "segmentation": {"size": [height, width], "counts": pred["counts"].decode()}})
        if rle_area(pred) > 0:
            box = rle_to_xywh(pred)
            box_iou[ann["id"]] = float(mask_utils.iou([box], [list(ann["bbox"])], [0])[0, 0])
            bbox_results.append({**entry, "bbox": box})

    counts = {"missing": len(prompted) - len(seen), "empty_masks": len(segm_results) - len(bbox_results)}
    return {
        "prompt": _summarize(mask_iou, box_iou, prompted, gt["categories"], counts),
        "segm": evaluate_coco(gt, segm_results, ["segm"], preset, max_dets)["segm"],
        "bbox": evaluate_coco(gt, bbox_results, ["bbox"], preset, max_dets)["bbox"],
    }


def _index_gt(gt: dict[str, Any]) -> tuple[dict[Any, tuple[int, int]], dict[Any, dict[str, Any]]]:
    """Image sizes ``{image id: (H, W)}`` and the prompted (non-crowd) annotations ``{id: annotation}``."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise ValueError(f"COCO ground truth has no list field {key!r}")
    sizes = {}
    for i, img in enumerate(gt["images"]):
        if not all(isinstance(img.get(k), int) for k in ("id", "height", "width")):
            raise ValueError(f"ground-truth image #{i} needs integer 'id', 'height' and 'width', got {img!r}")
        sizes[img["id"]] = (img["height"], img["width"])
    prompted, ids = {}, set()
    for i, ann in enumerate(gt["annotations"]):
        missing = [k for k in ("id", "image_id", "category_id", "segmentation", "bbox") if k not in ann]
        if missing:
            raise ValueError(f"ground-truth annotation #{i} (id {ann.get('id')}) lacks {missing}")
        if ann["id"] in ids:
            # Results point at annotations by id, so a repeated id would make them ambiguous.
            raise ValueError(f"ground-truth annotation #{i} repeats id {ann['id']!r}")
        if ann["image_id"] not in sizes:
            raise ValueError(f"ground-truth annotation #{i} (id {ann['id']}) has unknown image_id {ann['image_id']!r}")
        ids.add(ann["id"])
        if not ann.get("iscrowd", 0):
            prompted[ann["id"]] = ann
    return sizes, prompted


def _check_result(
    i: int,
    res: dict[str, Any],
    prompted: dict[Any, dict[str, Any]],
    sizes: dict[Any, tuple[int, int]],
    category_ids: set[Any],
    seen: dict[Any, int],
) -> dict[str, Any]:
    """Validate result ``#i`` and return the annotation it answers; records it in ``seen``."""
    missing = [k for k in _RESULT_KEYS if k not in res]
    if missing:
        raise ValueError(f"result #{i} lacks {missing}")
    score = res["score"]
    # NaN fails the range test too. numbers.Real lets numpy scalars through (bool is no score).
    if isinstance(score, bool) or not isinstance(score, numbers.Real) or not 0.0 <= score <= 1.0:
        raise ValueError(f"result #{i} has score {score!r}; the predicted IoU must be a number in [0, 1]")
    ann_id = res["annotation_id"]
    ann = prompted.get(ann_id)
    if ann is None:
        raise ValueError(f"result #{i} has annotation_id {ann_id!r}, which names no non-crowd ground-truth "
                         "annotation (crowd annotations are not prompted)")
    if ann_id in seen:
        raise ValueError(f"result #{i} has annotation_id {ann_id!r}, already prompted by result #{seen[ann_id]}")
    if res["image_id"] != ann["image_id"]:
        raise ValueError(f"result #{i} has image_id {res['image_id']!r}, but annotation {ann_id!r} "
                         f"is on image {ann['image_id']!r}")
    if res["category_id"] not in category_ids:
        raise ValueError(f"result #{i} has category_id {res['category_id']!r}; "
                         f"ground-truth ids are {sorted(category_ids)}")
    segm = res["segmentation"]
    # Checked here because pycocotools crashes or silently misreads an RLE of another size.
    problem = "it is not an RLE dict" if not isinstance(segm, dict) else rle_problem(segm, *sizes[ann["image_id"]])
    if problem:
        raise ValueError(f"result #{i} has a bad segmentation: {problem}")
    seen[ann_id] = i
    return ann


def _gt_rle(ann: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """The annotation's mask as a compressed RLE (``counts`` bytes), with errors naming the annotation."""
    segm = ann["segmentation"]
    problem = rle_problem(segm, height, width) if isinstance(segm, dict) else None
    if problem:
        raise ValueError(f"ground-truth annotation {ann['id']!r} has a bad segmentation: {problem}")
    try:
        return segmentation_to_rle(segm, height, width)
    except Exception as err:  # pycocotools raises a bare Exception on malformed polygons
        raise ValueError(f"ground-truth annotation {ann['id']!r} has a bad segmentation: {err}") from err


def _summarize(
    mask_iou: dict[Any, float],
    box_iou: dict[Any, float],
    prompted: dict[Any, dict[str, Any]],
    categories: list[dict[str, Any]],
    counts: dict[str, int],
) -> dict[str, Any]:
    """The per-prompt summaries over all prompted instances, the ``counts``, then the mIoU of each category."""
    ious = np.fromiter(mask_iou.values(), dtype=np.float64, count=len(mask_iou))
    boxes = np.fromiter(box_iou.values(), dtype=np.float64, count=len(box_iou))
    labels = np.asarray([prompted[ann_id]["category_id"] for ann_id in mask_iou], dtype=object)
    names = _category_names(categories)
    return {
        "mIoU": _mean(ious),
        "IoU@50": _mean(ious >= 0.5),
        "IoU@75": _mean(ious >= 0.75),
        "mean_box_IoU": _mean(boxes),
        "instances": len(ious),
        **counts,
        "per_class_mIoU": {names[cat["id"]]: _mean(ious[labels == cat["id"]]) for cat in categories},
    }


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def _category_names(categories: list[dict[str, Any]]) -> dict[Any, str]:
    """Category id -> name; a repeated name gets its id appended, as in the COCO per-class tables."""
    counts: dict[str, int] = {}
    for cat in categories:
        counts[cat["name"]] = counts.get(cat["name"], 0) + 1
    return {cat["id"]: cat["name"] if counts[cat["name"]] == 1 else f"{cat['name']} (id {cat['id']})"
            for cat in categories}


def prompt_stat_names(max_dets: Sequence[int]) -> list[str]:
    """Every ``"<group>/<stat>"`` summary :func:`prompted_metrics` reports, for these maxDets.

    The four ``prompt/`` summaries, then the 12 COCO statistics of ``segm`` and of ``bbox`` (see
    :func:`rsiseg.evaluation.coco.stat_names`); e.g. ``"prompt/mIoU"``, ``"segm/AP"``, ``"bbox/AR@100"``.
    """
    coco = stat_names(max_dets)
    return [f"prompt/{s}" for s in PROMPT_STATS] + [f"{group}/{s}" for group in ("segm", "bbox") for s in coco]


def format_prompt_metrics(metrics: dict[str, dict[str, Any]]) -> str:
    """Markdown tables of :func:`prompted_metrics`, in percent with one decimal (``-`` where undefined).

    The per-prompt summaries with the instance counts, the mIoU of each class, then the COCO
    ``segm`` and ``bbox`` tables of :func:`rsiseg.evaluation.coco.format_metrics_table`.
    """
    stats = metrics["prompt"]
    lines = ["| group | mIoU | IoU@50 | IoU@75 | mean box IoU |", "|---|---:|---:|---:|---:|"]
    lines.append("| prompt | " + " | ".join(percent(stats.get(s)) for s in PROMPT_STATS) + " |")
    lines += ["", f"instances: {stats['instances']}, missing (scored 0): {stats['missing']}, "
              f"empty masks: {stats['empty_masks']}"]
    per_class = stats.get("per_class_mIoU", {})
    if per_class:
        lines += ["", "| class | mIoU |", "|---|---:|"]
        lines += [f"| {name} | {percent(value)} |" for name, value in per_class.items()]
    coco = {group: metrics[group] for group in ("segm", "bbox") if group in metrics}
    if coco:
        lines += ["", format_metrics_table(coco)]
    return "\n".join(lines)
