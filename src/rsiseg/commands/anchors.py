"""``rsiseg anchors``: how well anchor configurations cover a dataset's boxes, and better ones.

Boxes are read from COCO JSONs and resized as the model resizes images (``--config`` gives
``model.min_size`` / ``max_size``, ``data.max_size`` and the current anchors). Recall at IoU 0.5,
0.7 and 0.75 is the share of boxes whose best anchor, on the RPN's anchor grid, reaches that IoU.
Compared: the config's anchors, torchvision's default, the iSAID report's stride-adjusted anchors,
a k-means suggestion and the best of an optuna search (``--trials``, on ``--max-images`` images,
with the anchors per location fixed). Writes ``OUT/anchors.json``, ``OUT/anchors.md`` and
``OUT/best_anchors.yaml`` (a ``model:`` snippet to paste into a config).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path

log = logging.getLogger(__name__)

OBJECTIVES = ("recall@0.5", "recall@0.7", "recall@0.75", "mean_best_iou")  # as rsiseg.tools.anchor_search


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, nargs="+", metavar="JSON", help="COCO instances JSON(s)")
    parser.add_argument("--config", metavar="YAML", help="experiment whose resize and anchors to use")
    parser.add_argument("--min-size", type=int, help="model.min_size (default: the config's, else 800)")
    parser.add_argument("--max-size", type=int, help="model.max_size (default: the config's, else 1333)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for anchors.json/.md, best_anchors.yaml")
    parser.add_argument("--trials", type=int, default=50, help="optuna trials (default 50)")
    parser.add_argument("--max-images", type=int, default=500, metavar="N",
                        help="images (seeded sample) the search evaluates on (default 500); 0 = all")
    parser.add_argument("--objective", choices=OBJECTIVES, default="recall@0.7", help="what the search maximises")
    parser.add_argument("--sizes-per-level", type=int, default=1, metavar="S",
                        help="sizes per level of the suggested anchors (default 1)")
    parser.add_argument("--num-ratios", type=int, default=3, metavar="R",
                        help="aspect ratios of the suggested anchors (default 3): S x R anchors per location")
    parser.add_argument("--per-level-ratios", action="store_true", help="search one ratio set per level")
    parser.add_argument("--clusters", type=int, default=9, help="k-means clusters (default 9)")
    parser.add_argument("--verify-images", type=int, default=2, metavar="N",
                        help="images on which the recall is checked against torchvision's dense anchors")
    parser.add_argument("--rpn-images", type=int, default=100, metavar="N",
                        help="images (seeded sample) for the RPN-positive column (default 100; 0 = skip)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples, k-means and the search")


def run(args: argparse.Namespace) -> int:
    from rsiseg.config import load_config
    from rsiseg.tools.anchor_boxes import ResizeRule, load_boxes
    from rsiseg.tools.anchor_recall import AnchorConfig
    from rsiseg.tools.anchor_search import SearchSpace
    from rsiseg.tools.anchors import AnchorOptions, analyse_anchors, write_anchor_report

    _check_counts(args)
    cfg = load_config(args.config) if args.config else None
    resize = ResizeRule(
        min_size=args.min_size or (cfg.model.min_size if cfg else 800),
        max_size=args.max_size or (cfg.model.max_size if cfg else 1333),
        pre_max_size=cfg.data.max_size if cfg else None,
    )
    current = None
    if cfg is not None:
        try:
            current = AnchorConfig(f"current ({Path(args.config).name})", cfg.model.anchor_sizes,
                                   cfg.model.anchor_ratios)
        except ValueError as err:
            raise ValueError(f"{args.config}: fields model.anchor_sizes / model.anchor_ratios: {err}") from None
    boxes = load_boxes(args.data, resize)
    if boxes.report.counts:
        log.warning(boxes.report.summary())
    space = SearchSpace(sizes_per_level=args.sizes_per_level, num_ratios=args.num_ratios,
                        per_level_ratios=args.per_level_ratios)
    options = AnchorOptions(space=space, trials=args.trials, objective=args.objective,
                            max_images=args.max_images or None, seed=args.seed, n_clusters=args.clusters,
                            verify_images=args.verify_images, rpn_images=args.rpn_images,
                            fg_iou=cfg.model.rpn_fg_iou if cfg else 0.7, bg_iou=cfg.model.rpn_bg_iou if cfg else 0.3)
    report = analyse_anchors(boxes, options, current, progress=not getattr(args, "quiet", False))
    report = {"sources": [str(p) for p in args.data], "config": args.config, "resize": asdict(resize)} | report
    paths = write_anchor_report(args.out, report)
    print((Path(args.out) / "anchors.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _check_counts(args: argparse.Namespace) -> None:
    """Refuse impossible counts before any file is read."""
    for name, low in (("trials", 1), ("max_images", 0), ("sizes_per_level", 1), ("num_ratios", 1),
                      ("clusters", 1), ("verify_images", 0), ("rpn_images", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    for name in ("min_size", "max_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
