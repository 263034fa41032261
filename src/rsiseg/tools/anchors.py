"""Anchor analysis: compare anchor configurations by ground-truth recall, suggest and search new ones.

:func:`analyse_anchors` evaluates, on every box of a dataset (in network-input pixels, see
:mod:`rsiseg.tools.anchor_boxes`), the configuration of the current experiment, torchvision's
default, the iSAID report's stride-adjusted anchors, a k-means suggestion and the best of an
optuna search (:mod:`rsiseg.tools.anchor_search`); :func:`write_anchor_report` writes
``anchors.json`` (everything), ``anchors.md`` (the table and the box statistics) and
``best_anchors.yaml`` (a ``model:`` snippet to paste into a config).

Recall at IoU t is the share of boxes whose best anchor, over every anchor of every level on
the image's grid, has IoU >= t (exact, :func:`~rsiseg.tools.anchor_recall.best_anchor_iou`,
checked against torchvision's dense anchors on a few images). The "RPN positive" column is
the share of boxes that own a positive anchor after the RPN's own matcher has given each anchor
to its highest-IoU box (overlapping boxes compete), on a sample of images.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rsiseg.evaluation.metrics import percent
from rsiseg.fileio import atomic_write
from rsiseg.tools.anchor_boxes import BoxSet, box_statistics
from rsiseg.tools.anchor_recall import (
    AnchorConfig,
    anchor_recall,
    best_anchor_iou,
    dense_best_anchor_iou,
    rpn_positive_share,
)
from rsiseg.tools.anchor_search import SearchSpace, kmeans_anchor_config, search_anchors

TORCHVISION_DEFAULT = AnchorConfig("torchvision default", [[32], [64], [128], [256], [512]], [[0.5, 1.0, 2.0]])
STRIDE_ADJUSTED = AnchorConfig("iSAID stride-adjusted", [[8, 16], [16, 32], [32, 64], [64, 128], [128, 256]],
                               [[0.5, 1.0, 2.0]])


@dataclass
class AnchorOptions:
    """What :func:`analyse_anchors` does.

    Attributes:
        space: shape of the k-means and searched configurations (anchors per location fixed).
        trials: optuna trials.
        objective: what the search maximises: ``recall@0.5|0.7|0.75`` or ``mean_best_iou``.
        max_images: images (a seeded sample) the search evaluates on; None = all.
        seed: seed of the sample, k-means and the sampler.
        n_clusters: k-means clusters.
        verify_images: images on which the exact best IoU is checked against torchvision's dense anchors.
        rpn_images: images (a seeded sample) of the "RPN positive" column; 0 = skip it.
        fg_iou: the RPN's foreground IoU (``model.rpn_fg_iou``).
        bg_iou: the RPN's background IoU (``model.rpn_bg_iou``).
    """

    space: SearchSpace = field(default_factory=SearchSpace)
    trials: int = 50
    objective: str = "recall@0.7"
    max_images: int | None = 500
    seed: int = 0
    n_clusters: int = 9
    verify_images: int = 2
    rpn_images: int = 100
    fg_iou: float = 0.7
    bg_iou: float = 0.3


def analyse_anchors(box_set: BoxSet, options: AnchorOptions, current: AnchorConfig | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Compare anchor configurations on ``box_set``, and find the k-means and optuna ones.

    Returns:
        A JSON-ready report: ``box_statistics``, ``options``, ``configs`` (one row of
        :func:`~rsiseg.tools.anchor_recall.anchor_recall` per configuration, plus ``rpn_positive``),
        ``kmeans`` (the clusters), ``search`` (every trial), ``verification`` and ``best``.
    """
    if len(box_set) == 0:
        raise ValueError(f"{box_set.report.source}: no usable boxes, so there is nothing to fit anchors to")
    kmeans, clusters = kmeans_anchor_config(box_set, options.space, options.n_clusters, options.seed)
    sample = box_set.sample_images(options.max_images, options.seed)
    starts = [c for c in (kmeans, current, TORCHVISION_DEFAULT, STRIDE_ADJUSTED) if c is not None]
    search = search_anchors(sample, options.space, trials=options.trials, objective=options.objective,
                            seed=options.seed, start=starts, progress=progress)
    configs = ([current] if current is not None else []) + [TORCHVISION_DEFAULT, STRIDE_ADJUSTED, kmeans, search.best]
    rpn_rows = _sample_rows(box_set, options.rpn_images, options.seed)
    rows = []
    for config in tqdm(configs, desc="recall table", disable=not progress):
        row = anchor_recall(box_set, config)
        share = rpn_positive_share(box_set, config, rpn_rows, options.fg_iou, options.bg_iou) if rpn_rows else None
        rows.append(row | {"rpn_positive": share})
    best = _best_row(rows, options.objective, options.space.per_location)
    return {
        "box_statistics": box_statistics(box_set),
        "options": asdict(options),
        "configs": rows,
        "best": best["name"],
        "best_anchors": {"anchor_sizes": best["anchor_sizes"], "anchor_ratios": best["anchor_ratios"]},
        "kmeans": clusters,
        "search": {"objective": options.objective, "images": sample.num_images, "boxes": len(sample),
                   "best_value": search.best_value, "enqueued": search.enqueued, "trials": search.trials},
        "rpn_positive_images": len(rpn_rows),
        "verification": verify_exact(box_set, configs, options.verify_images),
    }


def _sample_rows(box_set: BoxSet, count: int, seed: int) -> list[int]:
    if count <= 0:
        return []
    rows = np.random.default_rng(seed).permutation(box_set.num_images)[:count]
    return sorted(rows.tolist())


def _best_row(rows: list[dict[str, Any]], objective: str, per_location: int) -> dict[str, Any]:
    """The row of highest ``objective`` among those with at most ``per_location`` anchors per location.

    More anchors per location are not allowed to win by count; on a tie the earlier row (the
    current configuration first) is kept.
    """
    fair = [r for r in rows if r["anchors_per_location"] <= per_location] or rows
    return max(fair, key=lambda r: r[objective] if r[objective] is not None else -1.0)


def verify_exact(box_set: BoxSet, configs: list[AnchorConfig], images: int) -> dict[str, Any]:
    """Largest difference between the exact best IoU and torchvision's dense anchors on the first images with boxes."""
    with_boxes = sorted(set(box_set.image_index.tolist()))[:images]
    worst = 0.0
    for config in configs:
        rows, dense = dense_best_anchor_iou(box_set, config, with_boxes)
        if len(rows):
            worst = max(worst, float((best_anchor_iou(box_set, config)[0][rows] - dense.double()).abs().max()))
    return {"images": [box_set.file_names[i] for i in with_boxes], "max_abs_iou_difference": worst}


def report_markdown(report: dict[str, Any]) -> str:
    """``anchors.md``: the comparison table, each configuration's anchors and the box statistics."""
    stats, search = report["box_statistics"], report["search"]
    resize = report.get("resize", {})
    lines = [f"# Anchor analysis of {', '.join(report.get('sources', []))}", "",
             f"{stats['images']} images, {stats['boxes']} boxes, measured in network-input pixels (model resize: "
             f"short side {resize.get('min_size')}, long side at most {resize.get('max_size')}"
             + (f", after data.max_size {resize['pre_max_size']}" if resize.get("pre_max_size") else "") + "). "
             "Recall at t: share of boxes whose best anchor on the RPN's grid has IoU >= t; small/medium/large: "
             "COCO area buckets at IoU 0.5; RPN positive: share of boxes owning an anchor of IoU >= "
             f"{report['options']['fg_iou']} after the RPN's matcher gave each anchor to its best box "
             f"({report['rpn_positive_images']} images).", "",
             "| anchors | per location | R@0.5 | R@0.7 | R@0.75 | small R@0.5 | medium R@0.5 | large R@0.5 "
             "| mean best IoU | RPN positive |", "|---" * 10 + "|"]
    for r in report["configs"]:
        cells = [r["recall@0.5"], r["recall@0.7"], r["recall@0.75"], r["recall@0.5_small"],
                 r["recall@0.5_medium"], r["recall@0.5_large"]]
        lines.append(f"| {r['name']} | {r['anchors_per_location']} | " + " | ".join(percent(c) for c in cells)
                     + f" | {r['mean_best_iou']:.3f} | {percent(r['rpn_positive'])} |")
    lines += ["", f"Best ({search['objective']}, at most {report['options']['space']['sizes_per_level']}"
              f" x {report['options']['space']['num_ratios']} anchors per location): **{report['best']}**. "
              f"The search ran {len(search['trials'])} optuna trials on {search['images']} images "
              f"({search['boxes']} boxes), starting from {', '.join(search['enqueued']) or 'nothing'}; "
              f"its best {search['objective']} there: {percent(search['best_value'])}. Exact best IoU against "
              f"torchvision's dense anchors on {len(report['verification']['images'])} images: max difference "
              f"{report['verification']['max_abs_iou_difference']:.1e}.", "",
              "| anchors | sizes per level (P2..P6) | ratios h/w | best anchor on P2..P6 (share of boxes) |",
              "|---|---|---|---|"]
    for r in report["configs"]:
        levels = " / ".join(f"{100 * s:.0f}%" for s in r["best_level_share"].values())
        lines.append(f"| {r['name']} | {json.dumps(r['anchor_sizes'])} | {json.dumps(r['anchor_ratios'])} | {levels} |")
    lines += ["", "## Boxes (network-input pixels)", "",
              "| quantity | mean | min | p5 | p25 | median | p75 | p95 | max |", "|---" * 9 + "|"]
    for key in ("sqrt_area", "width", "height", "ratio_h_over_w", "boxes_per_image", "resized_short_side",
                "resized_long_side"):
        q = stats[key]
        lines.append(f"| {key} | " + " | ".join(f"{q.get(n, float('nan')):.4g}" for n in
                                                  ("mean", "min", "p5", "p25", "median", "p75", "p95", "max")) + " |")
    buckets = ", ".join(f"{n} {c}" for n, c in stats["size_buckets"].items())
    skipped = ", ".join(f"{k} {v}" for k, v in stats["skipped_or_repaired"].items()) or "none"
    lines += ["", f"COCO size buckets: {buckets}. Images without boxes: {stats['images_without_boxes']}. "
              f"Skipped or repaired annotations: {skipped}.", ""]
    return "\n".join(lines)


def best_anchors_yaml(report: dict[str, Any]) -> str:
    """``best_anchors.yaml``: a ``model:`` snippet with the best configuration's anchors."""
    best = next(r for r in report["configs"] if r["name"] == report["best"])
    metric = report["search"]["objective"]
    resize = report.get("resize", {})
    return (f"# {best['name']} anchors from `rsiseg anchors` on {', '.join(report.get('sources', []))}\n"
            f"# (model.min_size {resize.get('min_size')}, model.max_size {resize.get('max_size')}): "
            f"{metric} {percent(best[metric])}%, {best['anchors_per_location']} anchors per location\n"
            f"model:\n  anchor_sizes: {json.dumps(best['anchor_sizes'])}\n"
            f"  anchor_ratios: {json.dumps(best['anchor_ratios'])}\n")


def write_anchor_report(out_dir: str | Path, report: dict[str, Any]) -> list[Path]:
    """Write ``anchors.json``, ``anchors.md`` and ``best_anchors.yaml`` into ``out_dir`` atomically."""
    out = Path(out_dir)
    texts = {"anchors.json": json.dumps(report, indent=1), "anchors.md": report_markdown(report),
             "best_anchors.yaml": best_anchors_yaml(report)}
    return [atomic_write(out / name, lambda fh, text=text: fh.write(text)) for name, text in texts.items()]
