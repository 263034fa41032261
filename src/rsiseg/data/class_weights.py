"""Class weights for the partial cross-entropy: inverse pixel frequency over the training labels.

``rsiseg data class-weights`` writes them as JSON (``names``, ``counts``, ``weights``, ``absent``);
``model.seg.class_weights`` points the model at that file, and the weights travel in its checkpoints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsiseg.data.coco_index import DataError
from rsiseg.data.converters.potsdam import POTSDAM_CLASSES
from rsiseg.data.semantic import list_images, read_classes_json, read_label
from rsiseg.fileio import atomic_write


def compute_class_weights(labels_dir: str | Path, label_format: str, num_classes: int,
                          ignore_index: int = 255) -> dict[str, Any]:
    """Count the pixels of each class in every label map of ``labels_dir`` and weight them.

    A present class gets weight ``1 / frequency``, scaled so that the present classes average 1;
    an absent class gets 0 and is listed under ``absent``.

    Returns:
        ``{"names": [K], "counts": [K] int, "weights": [K] float, "absent": [names], "ignored": int,
        "files": int, "labels_dir": str, "label_format": str}``.

    Raises:
        DataError: no label maps, an unreadable one, or a value ``>= num_classes`` that is not ``ignore_index``.
    """
    labels_dir = Path(labels_dir)
    paths, _ = list_images(labels_dir)
    if not paths:
        raise DataError(f"{labels_dir}: no label maps found")
    counts = np.zeros(256, dtype=np.int64)
    for path in paths:
        histogram = np.bincount(read_label(path, label_format).ravel(), minlength=256)
        bad = [int(v) for v in np.flatnonzero(histogram) if v >= num_classes and v != ignore_index]
        if bad:
            raise DataError(f"{path}: label value(s) {bad[:5]} are not classes 0..{num_classes - 1} "
                            f"nor the ignore index {ignore_index}")
        counts += histogram
    class_counts = counts[:num_classes]
    present = class_counts > 0
    weights = np.zeros(num_classes, dtype=np.float64)
    weights[present] = class_counts[present].sum() / class_counts[present]
    weights[present] /= weights[present].mean()
    names = _class_names(labels_dir, label_format, num_classes)
    return {"names": names, "counts": class_counts.tolist(), "weights": weights.tolist(),
            "absent": [n for n, p in zip(names, present) if not p], "ignored": int(counts[ignore_index]),
            "files": len(paths), "labels_dir": str(labels_dir), "label_format": label_format}


def _class_names(labels_dir: Path, label_format: str, num_classes: int) -> list[str]:
    names = list(POTSDAM_CLASSES) if label_format == "potsdam_rgb" else read_classes_json(labels_dir)
    if names is None or len(names) != num_classes:
        return [f"class_{i}" for i in range(num_classes)]
    return names


def write_class_weights(path: str | Path, result: dict[str, Any]) -> Path:
    """Write :func:`compute_class_weights`'s result as indented JSON, atomically."""
    return atomic_write(path, lambda handle: json.dump(result, handle, indent=2))


def load_class_weights(path: str | Path, num_classes: int) -> torch.Tensor:
    """Read the ``weights`` of a class-weights JSON as float32 ``[K]``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or ``weights`` missing, not ``num_classes`` numbers, non-finite,
            negative or all zero; the message names the file and the field.
    """
    path = Path(path)
    where = f"model.seg.class_weights {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: not readable JSON ({type(err).__name__}: {err})") from None
    weights = data.get("weights") if isinstance(data, dict) else None
    if weights is None:
        raise ValueError(f"{where}: field 'weights' is missing")
    if not isinstance(weights, list) or len(weights) != num_classes:
        length = len(weights) if isinstance(weights, list) else type(weights).__name__
        raise ValueError(f"{where}: field 'weights' must list {num_classes} numbers (model.num_classes), got {length}")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"{where}: field 'weights[{i}]' is not a finite number: {w!r}")
        if w < 0:
            raise ValueError(f"{where}: field 'weights[{i}]' is negative: {w!r}")
    if not any(weights):
        raise ValueError(f"{where}: field 'weights' is all zero")
    return torch.tensor(weights, dtype=torch.float32)
