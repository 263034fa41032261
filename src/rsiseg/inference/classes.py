"""Matching a model's classes to a dataset's categories, by name, before anything is scored.

A 10-class model scored against 15-class ground truth, or a model trained on category ids 3-5
scored as ids 1-3, gives a wrong table with exit code 0. Here the model's class names (stored in
its checkpoint) must name exactly the data's categories; their ids may differ (results then carry
the data's ids). ``--class-map MODEL=DATA`` renames model classes explicitly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


def parse_class_map(pairs: Sequence[str] | None) -> dict[str, str]:
    """``["boat=ship", ...]`` -> ``{"boat": "ship"}``; a malformed or repeated pair is a ValueError."""
    mapping: dict[str, str] = {}
    for pair in pairs or []:
        model_name, sep, data_name = pair.partition("=")
        if not sep or not model_name or not data_name:
            raise ValueError(f"--class-map entries look like MODEL_CLASS=DATA_CATEGORY, got {pair!r}")
        if model_name in mapping:
            raise ValueError(f"--class-map names model class {model_name!r} twice")
        mapping[model_name] = data_name
    return mapping


def map_labels_to_categories(
    model_names: Sequence[str], model_ids: Sequence[int], categories: Sequence[dict[str, Any]],
    class_map: dict[str, str] | None = None, *, model_source: str = "the model", data_source: str = "the data",
) -> list[int]:
    """The data's category id of each model label (``[i]`` is label ``i + 1``'s), matched by name.

    Args:
        model_names: the model's class names in label order.
        model_ids: the category ids the model was trained with, in label order (for messages).
        categories: the data's COCO category entries (``id``, ``name``).
        class_map: model class name -> data category name, for classes named differently.
        model_source, data_source: what to call the two sides in errors (file names).

    Raises:
        ValueError: the (mapped) model classes and the data's categories are not the same set of
            names; the message lists both sides with their ids.
    """
    class_map = class_map or {}
    unknown = sorted(set(class_map) - set(model_names))
    if unknown:
        raise ValueError(f"--class-map names {unknown}, which {model_source} does not predict "
                         f"(its classes: {list(model_names)})")
    renamed = [class_map.get(name, name) for name in model_names]
    data_ids = {c["name"]: int(c["id"]) for c in categories}
    if len(set(renamed)) != len(renamed) or set(renamed) != set(data_ids):
        model_side = ", ".join(f"{n} ({i})" for n, i in zip(model_names, model_ids))
        data_side = ", ".join(f"{c['name']} ({c['id']})" for c in categories)
        raise ValueError(
            f"class mismatch: {model_source} predicts {len(model_names)} classes [{model_side}] but {data_source} "
            f"has {len(categories)} categories [{data_side}] (name (id)); map each model class to a data category "
            "with --class-map MODEL_CLASS=DATA_CATEGORY"
        )
    mapped = [data_ids[name] for name in renamed]
    if mapped != [int(i) for i in model_ids]:
        log.info("model classes matched to %s by name: category ids %s -> %s", data_source, list(model_ids), mapped)
    return mapped
