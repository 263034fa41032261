"""``rsiseg data split-semantic``: cut image tiles and their label maps into patches, split by tile."""

from __future__ import annotations

import argparse
import json

from rsiseg.commands.argtypes import int_in_range


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``data split-semantic`` flags to ``parser``."""
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of the image tiles")
    parser.add_argument("--labels", required=True, metavar="DIR", help="folder of their label maps (paired by name)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: train/ and val/, each with images/ and labels/")
    parser.add_argument("--size", type=int_in_range(1), default=300, help="patch side in pixels (default 300)")
    parser.add_argument("--overlap", type=int_in_range(0), default=0,
                        help="pixels shared by neighbouring patches (default 0)")
    parser.add_argument("--label-format", choices=["index", "potsdam_rgb"], default="index",
                        help="the labels: uint8 class indices (default), or the ISPRS RGB colours (Potsdam)")
    parser.add_argument("--skip-unlabelled", action="store_true",
                        help="leave out (and count) the images without a label map instead of refusing them")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                     help="share of the tiles for val, drawn with --seed (default 0.2)")
    val.add_argument("--val-tiles", metavar="KEY,KEY", help="the val tiles by name, e.g. top_potsdam_2_13")
    parser.add_argument("--seed", type=int_in_range(0), default=0, help="seed of the val draw (default 0)")


def run(args: argparse.Namespace) -> int:
    """Write the patches and print the summary as JSON."""
    from rsiseg.data.semantic_split import split_semantic  # deferred: keeps `rsiseg --help` light

    named = [k.strip() for k in args.val_tiles.split(",") if k.strip()] if args.val_tiles else None
    summary = split_semantic(args.images, args.labels, args.out, size=args.size, overlap=args.overlap,
                             label_format=args.label_format, val_fraction=args.val_fraction, val_tiles=named,
                             seed=args.seed, skip_unlabelled=args.skip_unlabelled, progress=not args.quiet)
    print(json.dumps({**{s: {"tiles": len(summary[s]["tiles"]), "patches": summary[s]["patches"]}
                         for s in ("train", "val")}, "unlabelled_skipped": len(summary["unlabelled_skipped"])},
                     indent=2))
    return 0
