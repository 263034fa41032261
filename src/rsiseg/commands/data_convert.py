"""``rsiseg data convert FORMAT``: one converter module per published format, imported on use.

This module imports nothing heavy at load time: ``cli.py`` takes its description and options
for ``--help``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

DESCRIPTION = """\
Convert a dataset in its published format to COCO instances JSON under OUT/annotations/.
Images are never copied: pass the folder that file_name is relative to (below) as the image
folder when training or validating. A missing or empty --src, or a run that finds no image,
is an error (exit 2) and writes nothing.

format   --src must hold                                          file_name is relative to
isaid    the iSAID release PNGs at any depth: Pxxxx.png,          SRC
         Pxxxx_instance_id_RGB.png, Pxxxx_instance_color_RGB.png
         (15-class palette); writes instances.json
hrsid    HRSID's COCO JSON files (SRC/annotations/*.json, each    the release's image
         written as hrsid_instances_<stem>.json; --ann picks      folder (as in its JSON);
         files), or its PNG id-mask variant (as isaid, ships)     SRC for the PNG variant
ssdd     SSDD's COCO JSON files in SRC/annotations (else SRC):    the SSDD image folder
         all are read and merged (repeated images must agree;     (as in its JSON)
         --ann reads only the files named); split officially
         (numbers ending in 1 or 9 are test) with inshore and
         offshore test subsets (--inshore, or an *inshore*.json)
nwpu     NWPU VHR-10's COCO JSON, found and merged as for ssdd;   NWPU's image folder
         split 7:3 by --seed                                      (as in its JSON)
yolo     data.yaml (or --ann FILE) naming train/val/test image    data.yaml's `path`
         folders, labels in the parallel labels/ folders; absent  (else its folder)
         splits are reported, --split converts one
whu      {train,val,test}/image and {train,val,test}/label        SRC
         (binary building masks); instances are 8-connected
         components (--min-area)
potsdam  ISPRS Potsdam RGB label tiles *label*.tif|png (any       (no JSON: writes
         depth), for the point-supervised semantic task           OUT/masks/<stem>.png and
                                                                  OUT/classes.json)

Every converter prints which files it read and counts every annotation it drops. Numbers that
are not finite or lie more than an image size outside the image are refused in COCO sources
(--skip-invalid drops and counts them) and dropped and counted in YOLO labels."""

# Which formats each format-specific option applies to; giving it to another format is an error.
OPTION_FORMATS: dict[str, tuple[str, ...]] = {
    "ann": ("hrsid", "ssdd", "nwpu", "yolo"),
    "skip_invalid": ("hrsid", "ssdd", "nwpu"),
    "split": ("yolo",),
    "inshore": ("ssdd",),
    "seed": ("nwpu",),
    "min_area": ("isaid", "hrsid", "whu"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rsiseg data convert``."""
    parser.add_argument("format", choices=["isaid", "hrsid", "ssdd", "nwpu", "yolo", "whu", "potsdam"])
    parser.add_argument("--src", required=True, metavar="DIR", help="the release folder; see the table above")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (writes DIR/annotations/*.json)")
    parser.add_argument("--ann", nargs="+", metavar="FILE",
                        help="hrsid/ssdd/nwpu: read only these COCO JSON files (default: every JSON found); "
                        "yolo: the data.yaml to read (default: SRC/data.yaml)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="hrsid/ssdd/nwpu: drop and count annotations with NaN, inf or far-outside coordinates "
                        "instead of refusing the file")
    parser.add_argument("--split", metavar="NAME", choices=["train", "val", "test"],
                        help="yolo: convert only this split of data.yaml")
    parser.add_argument("--min-area", type=int, help="isaid/hrsid (default 1), whu (default 10): drop and count "
                        "smaller instances")
    parser.add_argument("--inshore", metavar="FILE", help="ssdd: inshore test images (COCO JSON or a list of names)")
    parser.add_argument("--seed", type=int, help="nwpu: seed of the 7:3 train/val split (default 0)")


def _isaid(args: argparse.Namespace) -> dict[str, Any]:
    from rsiseg.data.converters.isaid import convert_isaid

    summary = convert_isaid(args.src, args.out, min_area=_or(args.min_area, 1), progress=not args.quiet)
    return {k: summary[k] for k in ("images", "instances", "skipped", "per_class")}


def _hrsid(args: argparse.Namespace) -> dict[str, Any]:
    from rsiseg.data.converters.hrsid import convert_hrsid

    return convert_hrsid(args.src, args.out, min_area=_or(args.min_area, 1), progress=not args.quiet,
                         ann=args.ann, skip_invalid=args.skip_invalid)


def _ssdd(args: argparse.Namespace) -> dict[str, Any]:
    from rsiseg.data.converters.ssdd import convert_ssdd

    return convert_ssdd(args.src, args.out, inshore=args.inshore, ann=args.ann, skip_invalid=args.skip_invalid)


def _nwpu(args: argparse.Namespace) -> dict[str, Any]:
    from rsiseg.data.converters.nwpu import convert_nwpu

    return convert_nwpu(args.src, args.out, seed=_or(args.seed, 0), ann=args.ann, skip_invalid=args.skip_invalid)


def _yolo(args: argparse.Namespace) -> dict[str, Any]:
    from rsiseg.data.converters.yolo import convert_yolo

    if args.ann and len(args.ann) > 1:
        raise ValueError(f"--ann: yolo reads one data.yaml, got {len(args.ann)} files")
    return convert_yolo(args.src, args.out, split=args.split, ann=args.ann[0] if args.ann else None)


def _whu(args: argparse.Namespace) -> dict[str, Any]:
    from rsiseg.data.converters.whu import convert_whu

    return convert_whu(args.src, args.out, min_area=_or(args.min_area, 10))


def _potsdam(args: argparse.Namespace) -> dict[str, Any]:
    from rsiseg.data.converters.potsdam import convert_potsdam

    return convert_potsdam(args.src, args.out)


CONVERTERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "isaid": _isaid,
    "hrsid": _hrsid,
    "ssdd": _ssdd,
    "nwpu": _nwpu,
    "yolo": _yolo,
    "whu": _whu,
    "potsdam": _potsdam,
}


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def check_options(args: argparse.Namespace) -> None:
    """Refuse options that the chosen format would silently ignore, and negative sizes."""
    for option, formats in OPTION_FORMATS.items():
        value = getattr(args, option, None)
        if value not in (None, False) and args.format not in formats:
            flag = "--" + option.replace("_", "-")
            raise ValueError(f"{flag} does not apply to {args.format} (only to {', '.join(formats)})")
    if args.min_area is not None and args.min_area < 0:
        raise ValueError(f"--min-area must be >= 0, got {args.min_area}")


def report_sources(summary: dict[str, Any]) -> None:
    """Say on stderr which files were read, which splits are missing and what was dropped."""
    for path, counts in summary.get("read", {}).items():
        print(f"read {path}: {counts['images']} images ({counts['new_images']} not in an earlier file)", file=sys.stderr)
    for what, n in summary.get("merged", {}).items():
        print(f"merged: {n} {what}", file=sys.stderr)
    for split, folder in summary.get("missing_splits", {}).items():
        print(f"missing split {split!r}: {folder} does not exist (not converted)", file=sys.stderr)
    dropped = summary.get("skipped") or summary.get("problems") or {}
    examples = summary.get("skipped_examples") or summary.get("problem_examples") or {}
    for reason, n in dropped.items():
        shown = "; ".join(examples.get(reason, [])[:2])
        print(f"dropped: {n} {reason}" + (f" (e.g. {shown})" if shown else ""), file=sys.stderr)


def run_convert(args: argparse.Namespace) -> int:
    """Run the converter for ``args.format``, report what it read and dropped, print its summary as JSON."""
    check_options(args)
    summary = CONVERTERS[args.format](args)
    if not getattr(args, "quiet", False):
        report_sources(summary)
    print(json.dumps(summary, indent=1))
    return 0
