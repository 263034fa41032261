"""``rsiseg data stats``: class counts, object sizes and foreground ratios of a COCO dataset."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rsiseg data stats``."""
    parser.add_argument("--data", required=True, metavar="ANNOTATIONS.json", help="COCO instances JSON")
    parser.add_argument("--images", metavar="DIR", help="image folder (accepted for symmetry; not read)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for stats.json, stats.md and figures")


def run(args: argparse.Namespace) -> int:
    """Compute and write the statistics; returns 2 when the JSON cannot be read."""
    from rsiseg.data.coco_index import DataError
    from rsiseg.data.stats import dataset_stats, stats_markdown, write_stats

    try:
        stats = dataset_stats(args.data, args.images)
    except DataError as err:
        print(f"error: {err}")
        return 2
    written = write_stats(stats, args.out)
    print(stats_markdown(stats))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
