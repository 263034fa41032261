"""``rsiseg data subset``: a reproducible by-image subset of a COCO instances JSON (e.g. iSAID-100)."""

from __future__ import annotations

import argparse
import json

from rsiseg.commands.argtypes import int_in_range


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``data subset`` flags to ``parser``."""
    parser.add_argument("--data", required=True, metavar="ANNOTATIONS.json", help="COCO instances JSON to draw from")
    parser.add_argument("--out", required=True, metavar="SUBSET.json", help="where the subset JSON is written")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--fraction", type=float, metavar="F",
                      help="keep round(F x images), at least 1, 0 < F <= 1 (iSAID-100: 0.4)")
    size.add_argument("--count", type=int_in_range(1), metavar="N", help="keep N images")
    parser.add_argument("--seed", type=int_in_range(0), default=0,
                        help="seed of the draw; the same file and seed give the same subset (default 0)")


def run(args: argparse.Namespace) -> int:
    """Write the subset and print the summary as JSON."""
    from rsiseg.data.subset import subset_coco  # deferred: keeps `rsiseg --help` free of torch

    summary = subset_coco(args.data, args.out, fraction=args.fraction, count=args.count, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0
