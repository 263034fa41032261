"""``rsiseg data convert FORMAT``: one converter module per published format, imported on use."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def _isaid(args: argparse.Namespace) -> dict[str, Any]:
    from rsiseg.data.converters.isaid import convert_isaid

    summary = convert_isaid(args.src, args.out, min_area=args.min_area or 1, progress=not args.quiet)
    return {k: summary[k] for k in ("images", "instances", "skipped", "per_class")}


def _hrsid(args: argparse.Namespace) -> dict[str, Any]:
    from rsiseg.data.converters.hrsid import convert_hrsid

    return convert_hrsid(args.src, args.out, min_area=args.min_area or 1, progress=not args.quiet)


def _ssdd(args: argparse.Namespace) -> dict[str, Any]:
    from rsiseg.data.converters.ssdd import convert_ssdd

    return convert_ssdd(args.src, args.out, inshore=args.inshore)


def _nwpu(args: argparse.Namespace) -> dict[str, Any]:
    from rsiseg.data.converters.nwpu import convert_nwpu

    return convert_nwpu(args.src, args.out, seed=args.seed)


def _yolo(args: argparse.Namespace) -> dict[str, Any]:
    from rsiseg.data.converters.yolo import convert_yolo

    return convert_yolo(args.src, args.out)


def _whu(args: argparse.Namespace) -> dict[str, Any]:
    from rsiseg.data.converters.whu import convert_whu

    return convert_whu(args.src, args.out, min_area=10 if args.min_area is None else args.min_area)


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


def run_convert(args: argparse.Namespace) -> int:
    """Run the converter for ``args.format`` and print its summary as JSON."""
    print(json.dumps(CONVERTERS[args.format](args), indent=1))
    return 0
