"""A reproducible by-image subset of a COCO instances JSON (``rsiseg data subset``).

The RELACT paper trains on iSAID-100, 40% of the iSAID training images; this module
draws such a subset so that anyone with the same file and seed gets the same images:

- The draw runs over the image ids **sorted**, so reordering the ``images`` list of the file
  does not change which images are kept.
- It takes the first ``k`` entries of ``numpy.random.default_rng(seed).permutation(n)``, so for
  one seed a smaller subset is contained in a larger one (10% of iSAID lies inside its 40%).
- Kept images stay in their order in the file; every annotation of a kept image is kept, every
  other one dropped; ``categories``, ``info``, ``licenses`` and any other top-level key are copied
  unchanged.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from rsiseg.data.coco_index import DataError, read_coco_json
from rsiseg.fileio import atomic_write

MAX_EXAMPLES = 5  # annotation ids named in the error about unknown image ids


def subset_size(n: int, fraction: float | None = None, count: int | None = None) -> int:
    """How many of ``n`` images a subset keeps: ``round(fraction * n)``, at least 1 when ``n > 0``, or ``count``.

    Raises:
        ValueError: not exactly one of ``fraction`` (``0 < f <= 1``) and ``count`` (int ``>= 1``) is
            given, or ``count > n``.
    """
    if (fraction is None) == (count is None):
        raise ValueError(f"give exactly one of fraction and count, got fraction={fraction!r}, count={count!r}")
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
                or not math.isfinite(fraction) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
        return max(1, round(fraction * n)) if n > 0 else 0
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    if count > n:
        raise ValueError(f"count {count} is more than the {n} images there are")
    return count


def pick_image_ids(image_ids: list[int], k: int, seed: int) -> set[int]:
    """The ``k`` image ids drawn by ``default_rng(seed)`` over ``sorted(image_ids)``.

    Args:
        image_ids: unique ids in any order; the result does not depend on it.
        k: how many to keep, ``0 <= k <= len(image_ids)``.
        seed: a non-negative integer.
    """
    ordered = sorted(image_ids)
    order = np.random.default_rng(seed).permutation(len(ordered))
    return {ordered[i] for i in order[:k]}


def subset_coco(data_path: str | Path, out_path: str | Path, fraction: float | None = None,
                count: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Write the images drawn from ``data_path`` and their annotations to ``out_path`` (atomically).

    Args:
        data_path: a COCO instances JSON (``images``, ``annotations``, ``categories`` lists).
        out_path: where the subset goes; must not be ``data_path`` itself.
        fraction: keep ``round(fraction * n)`` of the ``n`` images (at least 1), ``0 < fraction <= 1``.
        count: keep this many images instead, ``1 <= count <= n``.
        seed: seed of the draw, an integer ``>= 0``.

    Returns:
        A summary: ``data``, ``out``, ``images_kept``/``images_total``,
        ``annotations_kept``/``annotations_total``, ``categories`` (per category: ``id``, ``name``,
        ``annotations_kept``, ``annotations_total``; sorted by id), ``seed``, ``fraction``, ``count``
        (the one not given is None).

    Raises:
        ValueError: (:class:`DataError` for the file) the file is missing, not JSON or not COCO
            instances; an image has no integer ``id`` or a duplicate one; an annotation's
            ``image_id`` is not among the images; bad ``fraction``/``count``/``seed``; ``out_path``
            is ``data_path``. Each message names the file and the field.
    """
    data_path, out_path = Path(data_path), Path(out_path)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if out_path.resolve() == data_path.resolve():
        raise ValueError(f"{out_path}: the output would overwrite the input; choose another --out")
    coco = read_coco_json(data_path)
    image_ids = _image_ids(coco["images"], data_path)
    _check_annotations(coco["annotations"], set(image_ids), data_path)
    try:
        k = subset_size(len(image_ids), fraction, count)
    except ValueError as err:
        raise ValueError(f"{data_path}: {err}") from None
    kept_ids = pick_image_ids(image_ids, k, seed)
    images = [img for img in coco["images"] if img["id"] in kept_ids]
    annotations = [ann for ann in coco["annotations"] if ann["image_id"] in kept_ids]
    subset = {**coco, "images": images, "annotations": annotations}
    atomic_write(out_path, lambda handle: json.dump(subset, handle))
    return {
        "data": str(data_path), "out": str(out_path),
        "images_kept": len(images), "images_total": len(image_ids),
        "annotations_kept": len(annotations), "annotations_total": len(coco["annotations"]),
        "categories": _category_counts(coco["categories"], coco["annotations"], annotations),
        "seed": seed, "fraction": fraction, "count": count,
    }


def _image_ids(images: list[Any], path: Path) -> list[int]:
    """The ids of ``images`` in file order; each must be an integer and unique."""
    ids, seen = [], set()
    for i, img in enumerate(images):
        image_id = img.get("id") if isinstance(img, dict) else None
        if type(image_id) is not int:
            raise DataError(f"{path}: images[{i}] field 'id' is missing or not an integer")
        if image_id in seen:
            raise DataError(f"{path}: images[{i}] field 'id': duplicate image id {image_id}")
        seen.add(image_id)
        ids.append(image_id)
    return ids


def _check_annotations(annotations: list[Any], image_ids: set[int], path: Path) -> None:
    """Refuse annotations that are not objects or whose ``image_id`` names no image; the latter are counted."""
    unknown = []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise DataError(f"{path}: annotations[{i}] is not an object")
        image_id = ann.get("image_id")
        if type(image_id) is not int or image_id not in image_ids:
            unknown.append(f"annotations[{i}] (id {ann.get('id')!r}) image_id {image_id!r}")
    if unknown:
        raise DataError(f"{path}: field 'image_id' of {len(unknown)} of {len(annotations)} annotations names no "
                        f"image in 'images' (e.g. {'; '.join(unknown[:MAX_EXAMPLES])}); fix the file, e.g. with "
                        f"`rsiseg data validate --fix`, before taking a subset")


def _category_counts(categories: list[Any], all_anns: list[dict[str, Any]],
                     kept_anns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Kept and total annotations per category id, the file's categories first named, sorted by id.

    Category ids used by annotations but absent from ``categories`` are listed with name None, so
    that the counts add up to the annotation totals.
    """
    total = Counter(ann.get("category_id") for ann in all_anns)
    kept = Counter(ann.get("category_id") for ann in kept_anns)
    names = {cat.get("id"): cat.get("name") for cat in categories if isinstance(cat, dict)}
    ids = sorted(set(names) | set(total), key=_id_order)
    return [{"id": c, "name": names.get(c), "annotations_kept": kept[c], "annotations_total": total[c]} for c in ids]


def _id_order(category_id: Any) -> tuple[int, int, str]:
    """Integer ids first, in order; malformed ones (None, strings) after them, so sorting never fails."""
    return (0, category_id, "") if type(category_id) is int else (1, 0, repr(category_id))
