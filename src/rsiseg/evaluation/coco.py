"""COCO bbox and segm evaluation with faster-coco-eval, with COCO and iSAID presets.

The matching, accumulation and the 12 summary statistics all come from
``faster_coco_eval.COCOeval_faster``; this module only sets its parameters, validates the
inputs and reshapes the output. The metrics dict returned by :func:`evaluate_coco` is::

    {
        "bbox": {
            "AP": 0.41, "AP50": ..., "AP75": ..., "APs": ..., "APm": ..., "APl": ...,
            "AR@1": ..., "AR@10": ..., "AR@100": ..., "ARs": ..., "ARm": ..., "ARl": ...,
            "per_class": {"plane": 0.52, ...},       # AP@[.5:.95], area all, top maxDet
            "per_class_AP50": {"plane": 0.81, ...},  # AP@.5, area all, top maxDet
        },
        "segm": {...},
    }

Every value is a float in [0, 1], or ``None`` where COCO reports -1: no ground-truth object
falls in that area range (or category), so the metric is undefined. ``None`` (not NaN) keeps the
dict valid JSON. The AR keys carry the maxDets actually used (``AR@1000`` with the iSAID preset).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from rsiseg.config import IOU_TYPES
from rsiseg.evaluation.metrics import percent

logger = logging.getLogger(__name__)

AREA_LABELS = ("small", "medium", "large")
# COCO's upper bound for "any area"; kept identical so "all" means what it means in pycocotools.
_MAX_AREA = 1e5**2
_TABLE_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass(frozen=True)
class EvalPreset:
    """COCO evaluation parameters that differ between benchmarks.

    Attributes:
        max_dets: the three per-image detection caps, increasing. AP lines use the largest one,
            AR is reported for each (``AR@{d}``).
        area_ranges: ``(lo, hi)`` object-area bounds in px^2 for small, medium and large, in
            that order; an object of area ``a`` is in a range when ``lo <= a <= hi``.
    """

    max_dets: tuple[int, int, int]
    area_ranges: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]


PRESETS: dict[str, EvalPreset] = {
    "coco": EvalPreset(
        max_dets=(1, 10, 100),
        area_ranges=((0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, _MAX_AREA)),
    ),
    # The iSAID devkit: dense patches need 1000 detections, and its objects are measured on
    # 800x800 patches of very large scenes, hence the much larger size boundaries.
    "isaid": EvalPreset(
        max_dets=(1, 10, 1000),
        area_ranges=((0.0, 144.0**2), (144.0**2, 512.0**2), (512.0**2, _MAX_AREA)),
    ),
}


def stat_names(max_dets: Sequence[int]) -> list[str]:
    """Names of the 12 summary statistics, in ``COCOeval.stats`` order, for these maxDets."""
    ar_names = [f"AR@{d}" for d in max_dets]
    return ["AP", "AP50", "AP75", "APs", "APm", "APl", *ar_names, "ARs", "ARm", "ARl"]


def evaluate_coco(
    gt: dict[str, Any] | str | Path,
    results: list[dict[str, Any]],
    iou_types: Iterable[str] = IOU_TYPES,
    preset: str = "coco",
    max_dets: tuple[int, int, int] | None = None,
    verbose: bool = False,
) -> dict[str, dict[str, Any]]:
    """Evaluate COCO-format detections against a COCO ground truth.

    Args:
        gt: a COCO dataset dict (``images``, ``annotations``, ``categories``) or a path to its
            JSON file. Images without annotations are fine. It is not modified.
        results: COCO result dicts ``{"image_id", "category_id", "score", "bbox": [x, y, w, h],
            "segmentation": compressed RLE}``; ``segmentation`` is needed only for ``segm``.
            It is not modified. An empty list evaluates to zero AP (with a warning).
        iou_types: any of ``"bbox"`` and ``"segm"``.
        preset: a key of :data:`PRESETS` (``"coco"`` or ``"isaid"``).
        max_dets: three increasing per-image caps overriding the preset's.
        verbose: send the library's usual 12-line summaries to this module's logger (INFO).

    Returns:
        ``{iou_type: {12 statistics, "per_class", "per_class_AP50"}}`` as described in the
        module docstring; ``None`` marks an undefined metric.

    Raises:
        ValueError: unknown preset or iou type, bad ``max_dets``, or a malformed ground truth or
            result (the message names the entry at fault).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    bad = [t for t in iou_types if t not in IOU_TYPES]
    if bad or not iou_types:
        raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types}")
    params = PRESETS[preset]
    if max_dets is not None:
        params = EvalPreset(max_dets=_check_max_dets(max_dets), area_ranges=params.area_ranges)

    gt_data, source = _load_gt(gt)
    _check_results(results, gt_data, iou_types)
    if not results:
        logger.warning("evaluate_coco: no detections were given; every defined AP and AR is 0")

    metrics = {}
    for iou_type in iou_types:
        # faster-coco-eval adds keys to the top level of the dicts it is given (ids, areas,
        # "ignore", cached RLEs and, for bbox-only results, a box polygon as "segmentation"), so
        # each run gets shallow copies: the caller's data stays untouched, one iou type cannot
        # leak into the next, and the polygons of a dense dataset are not deep-copied.
        coco_gt = COCO(_shallow_copy_gt(gt_data))
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        evaluator = _run_eval(coco_gt, coco_dt, iou_type, params, verbose)
        metrics[iou_type] = _collect(evaluator, coco_gt, params.max_dets)
        logger.debug("evaluate_coco %s on %s: AP=%s", iou_type, source, metrics[iou_type]["AP"])
    return metrics


def _check_max_dets(max_dets: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(int(d) for d in max_dets)
    # The library sorts maxDets and finds stats by value, so duplicates or a wrong order would
    # silently mislabel the AR@ keys.
    if len(values) != 3 or values[0] < 1 or not values[0] < values[1] < values[2]:
        raise ValueError(f"max_dets must be three increasing positive ints, got {tuple(max_dets)}")
    return values  # type: ignore[return-value]


def _load_gt(gt: dict[str, Any] | str | Path) -> tuple[dict[str, Any], str]:
    """Read and validate the ground truth; returns it with a name for messages."""
    if isinstance(gt, (str, Path)):
        source = str(gt)
        try:
            with open(gt) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read COCO ground truth {source}: {err}") from err
    else:
        data, source = gt, "<gt dict>"
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"COCO ground truth {source} has no list field {key!r}")
    for i, ann in enumerate(data["annotations"]):
        missing = [k for k in ("image_id", "category_id", "bbox", "area") if k not in ann]
        if missing:
            raise ValueError(f"{source}: annotation #{i} (id {ann.get('id')}) lacks {missing}")
    return data, source


def _shallow_copy_gt(gt: dict[str, Any]) -> dict[str, Any]:
    # Annotation ids are the evaluator's match markers, where 0 means "unmatched"; datasets such
    # as SSDD start at 0. Results never refer to them, so they are renumbered 1..N.
    return {
        **gt,
        "images": [dict(img) for img in gt["images"]],
        "annotations": [{**ann, "id": i} for i, ann in enumerate(gt["annotations"], start=1)],
        "categories": [dict(cat) for cat in gt["categories"]],
    }


def _check_results(results: list[dict[str, Any]], gt: dict[str, Any], iou_types: tuple[str, ...]) -> None:
    """Reject results the library would crash on deep inside, or silently ignore."""
    image_ids = {img["id"] for img in gt["images"]}
    cat_ids = {cat["id"] for cat in gt["categories"]}
    field_of = {"bbox": "bbox", "segm": "segmentation"}
    needed = ["image_id", "category_id", "score"] + [field_of[t] for t in iou_types]
    for i, res in enumerate(results):
        missing = [k for k in needed if k not in res]
        if missing:
            raise ValueError(f"result #{i} lacks {missing} (needed for iou types {iou_types})")
        numbers = [res["score"], *(res.get("bbox") or [])]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
            raise ValueError(f"result #{i} has a non-finite or non-numeric score or bbox: "
                             f"score {res['score']!r}, bbox {res.get('bbox')!r}")
        if res["image_id"] not in image_ids:
            raise ValueError(f"result #{i} has image_id {res['image_id']!r}, which the ground truth lacks")
        # A category the ground truth lacks would be dropped without a word; it is nearly always
        # an off-by-one label mapping (contiguous 0..K-1 labels vs COCO ids).
        if res["category_id"] not in cat_ids:
            raise ValueError(
                f"result #{i} has category_id {res['category_id']!r}; ground-truth ids are {sorted(cat_ids)}"
            )


def _run_eval(
    coco_gt: COCO, coco_dt: COCO, iou_type: str, preset: EvalPreset, verbose: bool
) -> COCOeval_faster:
    """Run evaluate/accumulate/summarize with the preset's maxDets and area ranges."""
    print_function = logger.info if verbose else (lambda *args, **kwargs: None)
    evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=print_function)
    # Set on params (the pycocotools way) rather than through the constructor's `ranges`, which
    # older faster-coco-eval releases lack. summarize() reads both lists back, so the AP lines
    # use maxDets[-1] and the area stats use these bounds.
    evaluator.params.maxDets = list(preset.max_dets)
    evaluator.params.areaRng = [[0.0, _MAX_AREA], *[list(r) for r in preset.area_ranges]]
    evaluator.params.areaRngLbl = ["all", *AREA_LABELS]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def _collect(evaluator: COCOeval_faster, coco_gt: COCO, max_dets: Sequence[int]) -> dict[str, Any]:
    """The 12 statistics plus per-class AP from a summarized evaluator."""
    stats = np.asarray(evaluator.stats, dtype=np.float64)
    names = stat_names(max_dets)
    if stats.shape != (len(names),):
        raise RuntimeError(f"faster-coco-eval returned {stats.shape[0]} statistics, expected {len(names)}")
    out: dict[str, Any] = {name: _defined(v) for name, v in zip(names, stats)}

    # precision is [T, R, K, A, M] (IoU thresholds, recall thresholds, categories, area ranges,
    # maxDets); -1 marks "no ground truth", which must not be averaged in.
    precision = np.asarray(evaluator.eval["precision"])
    iou50 = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
    names_by_id = _category_names(coco_gt)
    out["per_class"], out["per_class_AP50"] = {}, {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        name = names_by_id[int(cat_id)]
        out["per_class"][name] = _mean_defined(precision[:, :, k, 0, -1])
        out["per_class_AP50"][name] = _mean_defined(precision[iou50, :, k, 0, -1])
    return out


def _category_names(coco_gt: COCO) -> dict[int, str]:
    """Category id -> display name; duplicate names get their id appended so none is lost."""
    cats = coco_gt.dataset["categories"]
    counts: dict[str, int] = {}
    for cat in cats:
        counts[cat["name"]] = counts.get(cat["name"], 0) + 1
    return {
        cat["id"]: cat["name"] if counts[cat["name"]] == 1 else f"{cat['name']} (id {cat['id']})" for cat in cats
    }


def _defined(value: float) -> float | None:
    return None if value < 0 else float(value)


def _mean_defined(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def format_metrics_table(metrics: dict[str, dict[str, Any]]) -> str:
    """Markdown tables of the main statistics and per-class AP, in percent with one decimal.

    Undefined values show as ``-``.
    """
    iou_types = [t for t in metrics if isinstance(metrics[t], dict)]
    lines = ["| type | " + " | ".join(_TABLE_COLUMNS) + " |", "|---" * (len(_TABLE_COLUMNS) + 1) + "|"]
    for iou_type in iou_types:
        cells = [percent(metrics[iou_type].get(col)) for col in _TABLE_COLUMNS]
        lines.append(f"| {iou_type} | " + " | ".join(cells) + " |")

    # Classes in first-seen order so the table follows the dataset's category order.
    classes = list(dict.fromkeys(c for t in iou_types for c in metrics[t].get("per_class", {})))
    if classes:
        lines += ["", "| class | " + " | ".join(f"{t} AP" for t in iou_types) + " |"]
        lines.append("|---" * (len(iou_types) + 1) + "|")
        for cls in classes:
            cells = [percent(metrics[t].get("per_class", {}).get(cls)) for t in iou_types]
            lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
