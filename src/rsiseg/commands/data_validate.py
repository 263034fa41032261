"""``rsiseg data validate``: check a COCO dataset, print every problem kind, optionally repair it."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rsiseg data validate``."""
    parser.add_argument("--data", required=True, metavar="ANNOTATIONS.json", help="COCO instances JSON to check")
    parser.add_argument("--images", required=True, metavar="DIR", help="folder the file_name entries are relative to")
    parser.add_argument("--report", metavar="OUT.json", help="also write the report as JSON")
    parser.add_argument("--fix", metavar="OUT.json", help="write a repaired copy of the annotations")
    parser.add_argument("--skip-images", action="store_true", help="do not open the image files (JSON checks only)")


def run(args: argparse.Namespace) -> int:
    """Validate ``args.data``; returns 1 when there are errors (warnings alone give 0), 2 for unreadable JSON."""
    from rsiseg.data.coco_index import DataError
    from rsiseg.data.validate import UNFIXABLE, fix_coco, validate_coco
    from rsiseg.fileio import atomic_write

    quiet = getattr(args, "quiet", False)
    try:
        report = validate_coco(args.data, args.images, check_images=not args.skip_images, progress=not quiet)
    except DataError as err:
        print(f"error: {err}")
        return 2
    print(report.summary())
    if args.report:
        atomic_write(args.report, lambda handle: json.dump(report.to_dict(), handle, indent=2))
        print(f"wrote {args.report}")
    if args.fix:
        fixed, actions = fix_coco(args.data, report.unusable_images)
        atomic_write(args.fix, lambda handle: json.dump(fixed, handle))
        print(f"wrote {args.fix}: {sum(actions.values())} changes")
        for action, n in actions.most_common():
            print(f"  {n:6d}  {action}")
        left = sorted(k for k in report.counts if k in UNFIXABLE)
        if left:
            print(f"not fixed (needs a person): {', '.join(left)}")
    elif not report.ok:
        fixable = sum(n for k, n in report.errors.items() if k not in UNFIXABLE)
        if fixable:
            print(f"{fixable} of these errors can be dropped or repaired: rerun with --fix OUT.json "
                  "and train on OUT.json")
    return 0 if report.ok else 1
