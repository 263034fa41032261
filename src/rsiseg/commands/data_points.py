"""``rsiseg data points``: one point per object of a COCO instances JSON (the prompts of PointSAM)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rsiseg.commands.argtypes import int_in_range
from rsiseg.config import POINT_RULES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``data points`` flags to ``parser``."""
    parser.add_argument("--ann", required=True, metavar="INSTANCES.json",
                        help="COCO instances JSON; every non-crowd annotation gets one point")
    parser.add_argument("--out", required=True, metavar="POINTS.json", help="where the points JSON is written")
    parser.add_argument("--rule", choices=POINT_RULES, default="center",
                        help="center: the mask pixel farthest from the mask border; random: a uniformly drawn "
                             "mask pixel (default center)")
    parser.add_argument("--seed", type=int_in_range(0), default=0,
                        help="seed of --rule random; the same file and seed give the same points (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    """Write the points JSON and print the report.

    Raises:
        ValueError: ``--out`` exists without ``--overwrite``, or is the ``--ann`` file itself;
            (:class:`~rsiseg.data.coco_index.DataError`) a malformed COCO file, naming the field.
    """
    from rsiseg.data.instance_points import points_from_coco, write_points_json  # deferred: imports torch

    out = Path(args.out)
    if out.resolve() == Path(args.ann).resolve():
        raise ValueError(f"{out}: the output would overwrite the input; choose another --out")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    data, report = points_from_coco(args.ann, args.rule, args.seed, progress=not getattr(args, "quiet", False))
    write_points_json(data, out)
    print(report.summary())
    print(f"wrote {out}")
    return 0
