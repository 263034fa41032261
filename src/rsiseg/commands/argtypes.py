"""argparse value types shared by the subcommands: bounded integers, [0, 1] numbers, increasing lists."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence


def int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]``; argparse names the option when it is not."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {f'>= {low}' if high is None else f'in {low}..{high}'}, "
                                             f"got {value}")
        return value

    return parse


def unit_float(text: str) -> float:
    """An argparse ``type``: a number in [0, 1] (a score or IoU threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


class IncreasingInts(argparse.Action):
    """Store ``nargs`` integers that must strictly increase (COCO ``maxDets``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Sequence[int],
                 option_string: str | None = None) -> None:
        if any(b <= a for a, b in zip(values, values[1:])):
            parser.error(f"argument {option_string}: must increase, e.g. 1 10 100; got {' '.join(map(str, values))}")
        setattr(namespace, self.dest, list(values))
