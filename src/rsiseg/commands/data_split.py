"""``rsiseg data split``: cut large scenes and their COCO annotations into overlapping patches."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``data split`` flags to ``parser``."""
    parser.add_argument("--data", required=True, metavar="ANNOTATIONS.json", help="COCO instances of the scenes")
    parser.add_argument("--images", required=True, metavar="DIR", help="root of the scenes' file_name")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (images/, annotations/)")
    parser.add_argument("--size", type=int, default=800, help="patch side in pixels")
    parser.add_argument("--overlap", type=int, default=200, help="pixels shared by neighbouring patches")
    parser.add_argument("--min-visible", type=float, default=0.0,
                        help="drop clipped instances keeping less than this fraction of their pixels")
    parser.add_argument("--max-instances", type=int, default=None, metavar="N",
                        help="drop patches with more instances (iSAID recipe: 400)")
    parser.add_argument("--max-empty-fraction", type=float, default=None, metavar="F",
                        help="keep this fraction of patches without instances (iSAID recipe: 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the empty-patch draw")


def run(args: argparse.Namespace) -> int:
    """Split the dataset and print the summary as JSON."""
    from rsiseg.data.tiling import split_coco  # deferred: keeps `rsiseg --help` free of torch

    summary = split_coco(
        args.data, args.images, args.out, size=args.size, overlap=args.overlap,
        min_visible=args.min_visible, max_instances_per_image=args.max_instances,
        max_empty_fraction=args.max_empty_fraction, seed=args.seed, progress=not args.quiet,
    )
    print(json.dumps(summary, indent=2))
    return 0
