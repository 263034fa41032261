"""Dataset statistics of a COCO instances JSON: counts, object sizes and foreground ratios.

The foreground-ratio bins follow Table I of "Insight Any Instance" (union of instance masks over
the image area, binned into [0, 0.1), [0.1, 0.2) and [0.2, 1]); the size marks are COCO's small /
medium limits (32, 96 px) and the iSAID "large" limit (144 px), all on sqrt(box area).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from pycocotools import mask as mask_utils

from rsiseg.data.coco_index import DataError, number_problem, read_coco_json
from rsiseg.structures import rle_area, segmentation_to_rle

SIZE_MARKS = (32.0, 96.0, 144.0)
FOREGROUND_BINS = ((0.0, 0.1), (0.1, 0.2), (0.2, 1.0))
FOREGROUND_BIN_NAMES = ("[0, 0.1)", "[0.1, 0.2)", "[0.2, 1]")


def dataset_stats(ann_file: str | Path, images_dir: str | Path | None = None) -> dict[str, Any]:
    """Statistics of a COCO instances JSON, all computed from the JSON alone.

    Expects a dataset that passes ``rsiseg data validate`` (every annotation has a bbox).

    Args:
        ann_file: COCO instances JSON.
        images_dir: accepted for a uniform interface with the other data tools; not read, since
            image sizes and masks are in the JSON.

    Returns:
        A JSON-ready dict: totals, ``instances_per_class``, ``objects_per_image`` (summary),
        ``box_size`` (sqrt-area summary and counts per size range), ``foreground_ratio`` (mean and
        counts per bin), ``per_image`` rows and the raw ``box_sqrt_areas`` for figures.
    """
    raw = read_coco_json(Path(ann_file))
    _refuse_bad_numbers(raw, ann_file)
    names = {c["id"]: c["name"] for c in raw["categories"]}
    by_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in raw["images"]}
    for ann in raw["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    per_class = Counter(names.get(a["category_id"], str(a["category_id"])) for a in raw["annotations"])
    sqrt_areas = [max(a["bbox"][2], 0) ** 0.5 * max(a["bbox"][3], 0) ** 0.5 for a in raw["annotations"]]
    per_image = [{"file_name": img["file_name"], "objects": len(by_image[img["id"]]),
                  "foreground_ratio": foreground_ratio(by_image[img["id"]], img["height"], img["width"])}
                 for img in raw["images"]]
    counts = [row["objects"] for row in per_image]
    ratios = [row["foreground_ratio"] for row in per_image]
    return {
        "source": str(ann_file),
        "num_images": len(raw["images"]),
        "num_annotations": len(raw["annotations"]),
        "num_categories": len(raw["categories"]),
        "instances_per_class": {names[cid]: per_class.get(names[cid], 0) for cid in sorted(names)},
        "objects_per_image": _summary(counts) | {"empty_images": counts.count(0)},
        "box_size": _summary(sqrt_areas) | {
            "small (<32)": sum(s < 32 for s in sqrt_areas),
            "medium [32, 96)": sum(32 <= s < 96 for s in sqrt_areas),
            "large (>=96)": sum(s >= 96 for s in sqrt_areas),
            "iSAID large (>=144)": sum(s >= 144 for s in sqrt_areas),
        },
        "foreground_ratio": _summary(ratios) | {"bins": dict(zip(FOREGROUND_BIN_NAMES, foreground_bins(ratios)))},
        "per_image": per_image,
        "box_sqrt_areas": sqrt_areas,
    }


def _refuse_bad_numbers(raw: dict[str, Any], ann_file: str | Path) -> None:
    """Stop before rasterising: a NaN or absurd vertex would make pycocotools allocate gigabytes."""
    sizes = {img.get("id"): (img.get("width", 0), img.get("height", 0)) for img in raw["images"]}
    for ann in raw["annotations"]:
        width, height = sizes.get(ann.get("image_id"), (0, 0))
        problem = number_problem(ann, width, height)
        if problem:
            raise DataError(f"{ann_file}: annotation id {ann.get('id')}: {problem[0]}: {problem[1]}; "
                            "repair it with rsiseg data validate --fix OUT.json")


def foreground_ratio(anns: list[dict[str, Any]], height: int, width: int) -> float:
    """Union of the instance masks over the image area.

    Masks are merged as RLEs (no dense decode). An annotation without a segmentation counts
    with its box, so box-only datasets still get a ratio.
    """
    rles = []
    for ann in anns:
        segm = ann.get("segmentation")
        if not segm:
            x, y, w, h = ann["bbox"]
            segm = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        rles.append(segmentation_to_rle(segm, height, width))
    if not rles:
        return 0.0
    return rle_area(mask_utils.merge(rles, intersect=0)) / float(height * width)


def foreground_bins(ratios: list[float]) -> list[int]:
    """Number of images per bin of :data:`FOREGROUND_BINS` (the last bin includes 1)."""
    out = [0] * len(FOREGROUND_BINS)
    for r in ratios:
        out[next(i for i, (_, hi) in enumerate(FOREGROUND_BINS) if r < hi or i == len(FOREGROUND_BINS) - 1)] += 1
    return out


def write_stats(stats: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``stats.json``, ``stats.md`` and four PNG figures; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "stats.json", out / "stats.md"]
    # The raw per-instance sizes are only needed for the figure; iSAID has 655k of them.
    (out / "stats.json").write_text(json.dumps({k: v for k, v in stats.items() if k != "box_sqrt_areas"}, indent=2))
    (out / "stats.md").write_text(stats_markdown(stats))

    fig, ax = _figure()
    classes = stats["instances_per_class"]
    ax.bar(range(len(classes)), list(classes.values()))
    ax.set_xticks(range(len(classes)), list(classes), rotation=45, ha="right")
    ax.set(title="instances per class", ylabel="instances")
    written.append(_save(fig, out / "instances_per_class.png"))

    fig, ax = _figure()
    counts = [row["objects"] for row in stats["per_image"]]
    ax.hist(counts, bins=min(50, max(counts, default=0) + 1))
    ax.set(title="objects per image", xlabel="objects", ylabel="images")
    written.append(_save(fig, out / "objects_per_image.png"))

    fig, ax = _figure()
    ax.hist(stats["box_sqrt_areas"], bins=50)
    for mark, label in zip(SIZE_MARKS, ("COCO 32", "COCO 96", "iSAID 144")):
        ax.axvline(mark, color="red", linestyle="--", linewidth=1)
        ax.text(mark, ax.get_ylim()[1] * 0.95, f" {label}", color="red", fontsize=8)
    ax.set(title="box size", xlabel="sqrt(box area) [px]", ylabel="instances")
    written.append(_save(fig, out / "box_sizes.png"))

    fig, ax = _figure()
    bins = stats["foreground_ratio"]["bins"]
    ax.bar(list(bins), list(bins.values()))
    ax.set(title="foreground-pixel ratio per image", xlabel="ratio", ylabel="images")
    written.append(_save(fig, out / "foreground_ratio.png"))
    return written


def stats_markdown(stats: dict[str, Any]) -> str:
    """A short Markdown summary of :func:`dataset_stats`' output."""
    n = max(stats["num_images"], 1)
    opi, box, fg = stats["objects_per_image"], stats["box_size"], stats["foreground_ratio"]
    lines = [f"# {stats['source']}", "",
             f"{stats['num_images']} images, {stats['num_annotations']} instances, "
             f"{stats['num_categories']} categories", "",
             "| class | instances |", "|---|---:|"]
    lines += [f"| {name} | {count} |" for name, count in stats["instances_per_class"].items()]
    lines += ["", "| objects per image | min | median | mean | max | empty images |", "|---|---:|---:|---:|---:|---:|",
              f"| | {opi['min']:g} | {opi['median']:g} | {opi['mean']:.2f} | {opi['max']:g} | {opi['empty_images']} |",
              "", "| sqrt(box area) | count |", "|---|---:|"]
    lines += [f"| {k} | {box[k]} |" for k in ("small (<32)", "medium [32, 96)", "large (>=96)", "iSAID large (>=144)")]
    lines += ["", f"| foreground ratio (mean {fg['mean']:.3f}) | images | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v} | {v / n:.1%} |" for k, v in fg["bins"].items()]
    return "\n".join(lines) + "\n"


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"min": 0.0, "median": 0.0, "mean": 0.0, "max": 0.0}
    return {"min": float(min(values)), "median": float(statistics.median(values)),
            "mean": float(statistics.fmean(values)), "max": float(max(values))}


def _figure() -> tuple[Figure, Any]:
    # Figure() directly instead of pyplot: no global backend state, safe in headless runs and threads.
    fig = Figure(figsize=(7, 4), layout="constrained")
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path
