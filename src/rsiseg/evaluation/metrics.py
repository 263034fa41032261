"""What every task's metrics share: lookup by ``"<group>/<stat>"``, JSON output, percent cells.

A task's evaluation returns a nested dict ``{group: {stat: value, ...}, ...}`` (``bbox``/``segm``
for instances, ``semantic`` for semantic segmentation); leaves are floats, ``None`` where a metric
is undefined, or per-class dicts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rsiseg.fileio import atomic_write


def metric_value(metrics: dict[str, dict[str, Any]], name: str) -> float:
    """Look up one summary statistic by ``"<group>/<stat>"``, e.g. ``"segm/AP50"`` or ``"semantic/mIoU"``.

    Returns:
        The value, or NaN where the metric is undefined (stored as ``None``).

    Raises:
        ValueError: the name is not one of the statistics present, which the message lists.
    """
    valid = [
        f"{iou_type}/{key}"
        for iou_type, stats in metrics.items()
        if isinstance(stats, dict)
        for key, value in stats.items()
        if value is None or isinstance(value, (int, float))
    ]
    if name not in valid:
        raise ValueError(f"unknown metric {name!r}; valid names: {', '.join(valid)}")
    iou_type, key = name.split("/", 1)
    value = metrics[iou_type][key]
    return math.nan if value is None else float(value)


def percent(value: float | None) -> str:
    """A table cell: percent with one decimal, ``-`` where undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100.0 * value:.1f}"


def write_metrics(metrics: dict[str, Any], path: str | Path) -> None:
    """Write ``metrics`` as JSON (indent 2) atomically, creating the parent folder if needed."""
    # allow_nan=False: a NaN would make the file unreadable by strict JSON parsers.
    text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda handle: handle.write(text))
