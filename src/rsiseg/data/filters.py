"""Training-set filters of the iSAID report: crowded images out, and a cap on images without instances.

Both leave out whole images from the training split (never from evaluation) and say how many.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TypeVar

from rsiseg.data.coco_index import CocoIndex

T = TypeVar("T")


def filter_training_images(index: CocoIndex, max_instances: int | None, max_empty_fraction: float | None,
                           seed: int = 0) -> str:
    """Drop images from ``index.images`` in place; returns a one-line account for the log.

    Args:
        max_instances: images with more (non-crowd) instances than this are left out; None keeps all.
        max_empty_fraction: keep ``floor(fraction * n_empty)`` of the images without instances
            (as ``data split --max-empty-fraction`` does with patches), a draw with ``seed`` that
            is the same on every run; None keeps all.

    Raises:
        ValueError: every image would be left out.
    """
    def instances(image: dict) -> int:
        return sum(not ann.get("iscrowd", 0) for ann in index.anns_by_image.get(image["id"], []))

    counts = {image["id"]: instances(image) for image in index.images}
    before = len(index.images)
    kept = [image for image in index.images if max_instances is None or counts[image["id"]] <= max_instances]
    crowded = before - len(kept)
    dropped_empty = 0
    if max_empty_fraction is not None:
        empty = [image["id"] for image in kept if counts[image["id"]] == 0]
        chosen = set(draw_kept_share(empty, max_empty_fraction, seed))
        dropped_empty = len(empty) - len(chosen)
        kept = [image for image in kept if counts[image["id"]] > 0 or image["id"] in chosen]
    if not kept:
        raise ValueError(f"{index.ann_file}: data.max_instances = {max_instances} and data.max_empty_fraction = "
                         f"{max_empty_fraction} leave no training image")
    index.images = kept
    return (f"{index.ann_file}: training filters kept {len(kept)} of {before} images "
            f"({crowded} with more than {max_instances} instances left out, {dropped_empty} empty images left out)")


def draw_kept_share(items: Sequence[T], fraction: float, seed: int) -> list[T]:
    """``floor(fraction * len(items))`` of ``items``, drawn with ``seed`` (the same draw on every run)."""
    return random.Random(seed).sample(list(items), int(math.floor(fraction * len(items))))
