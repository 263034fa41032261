"""Export of predictions as COCO results (the ``[{image_id, category_id, bbox, score, ...}]`` list).

Predictions are one dict per image (the rsiseg Mask R-CNN eval output):

* ``boxes``: ``float32 [N, 4]``, xyxy in original-image pixels;
* ``labels``: ``int64 [N]`` in 1..K (0 is background);
* ``scores``: ``float32 [N]`` in [0, 1];
* ``roi_masks`` (optional): ``float32 [N, M, M]`` (or ``[N, 1, M, M]``) mask probabilities in
  [0, 1] over each detection's box, as torchvision's ``maskrcnn_inference`` gives them; they are
  pasted and binarised inside each box only (:mod:`rsiseg.inference.paste`), so no full-size
  raster is made;
* ``image_size``: ``int64 [2]`` = ``(H, W)`` of the original image, required with ``roi_masks``;
* ``masks`` (optional, used only without ``roi_masks``): ``float [N, 1, H, W]`` (or ``[N, H, W]``)
  probabilities in [0, 1] at full image size, for tools that produce full-size masks.

Without either mask field the prediction is box-only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rsiseg.fileio import atomic_write
from rsiseg.inference.paste import roi_masks_to_rles
from rsiseg.structures import masks_to_rles, rle_area, xyxy_to_xywh

# Masks are binarised this many at a time: the float probabilities of a dense scene
# (1000 x 800 x 800) take 2.5 GB, so a full-batch boolean temporary is avoided.
_MASK_CHUNK = 64


def prediction_to_coco(
    pred: Mapping[str, torch.Tensor],
    image_id: int,
    label_to_category_id: Sequence[int] | Mapping[int, int],
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
    max_detections: int | None = None,
) -> list[dict[str, Any]]:
    """Turn one image's prediction into COCO result entries.

    Args:
        pred: ``boxes`` float[N, 4] xyxy pixels, ``labels`` int64[N] in 1..K, ``scores``
            float[N] in [0, 1]; optional ``roi_masks`` float[N, M, M] box-relative probabilities
            with ``image_size`` (H, W), or else optional full-size ``masks`` float[N, 1, H, W] or
            [N, H, W] in [0, 1] (see the module docstring). Tensors may live on any device.
        image_id: COCO id of the image.
        label_to_category_id: dataset category id of each model label. A sequence lists the
            category ids in label order (``seq[0]`` is the category of label 1, as in
            ``[c["id"] for c in coco["categories"]]``); a mapping maps label -> category id.
        score_threshold: detections with ``score < score_threshold`` are dropped.
        mask_threshold: a pixel is foreground when its probability is ``> mask_threshold``
            (must be >= 0 with ``roi_masks``: pixels outside a box are 0 and stay background).
        max_detections: keep at most this many detections (the highest scoring); None keeps all.

    Returns:
        Entries sorted by descending score, each ``{"image_id": int, "category_id": int,
        "bbox": [x, y, w, h] floats, "score": float, "area": float}`` plus, when the
        prediction has masks, ``"segmentation"``: a compressed RLE ``{"size": [H, W],
        "counts": str}``. ``area`` is the mask's pixel count, or ``w * h`` for box-only entries.

    Raises:
        ValueError: a field is missing (``image_size`` with ``roi_masks``) or mis-shaped, or a
            label has no category id.
    """
    boxes, labels, scores = _check_fields(pred)
    category_ids = _map_labels(labels, label_to_category_id)

    keep = torch.nonzero(scores >= score_threshold).flatten()
    # Stable sort so that ties keep the model's order, which makes exports reproducible.
    order = keep[torch.sort(scores[keep], descending=True, stable=True).indices]
    if max_detections is not None:
        order = order[: max(int(max_detections), 0)]

    xywh = xyxy_to_xywh(boxes[order]).tolist()
    scores_kept = scores[order].tolist()
    categories_kept = [category_ids[i] for i in order.tolist()]
    entries = [
        {"image_id": int(image_id), "category_id": cat, "bbox": box, "score": score}
        for cat, box, score in zip(categories_kept, xywh, scores_kept)
    ]

    rles = _encode_segmentations(pred, boxes, order, mask_threshold)
    if rles is not None:
        for entry, rle in zip(entries, rles):
            entry["segmentation"] = rle
            entry["area"] = rle_area(rle)
    else:
        for entry in entries:
            entry["area"] = float(entry["bbox"][2] * entry["bbox"][3])
    return entries


def write_coco_results(results: list[dict[str, Any]], path: str | Path) -> Path:
    """Write COCO result entries as JSON, atomically.

    The JSON goes to a temporary file in the destination directory and is then moved into
    place with ``os.replace``, so a reader (or an interrupted run) never sees a half-written file.

    Args:
        results: entries as returned by :func:`prediction_to_coco` (``counts`` must be ``str``).
        path: destination; missing parent directories are created.

    Returns:
        The destination path.
    """
    return atomic_write(path, lambda handle: json.dump(results, handle))


def read_coco_results(path: str | Path, *, allow_dataset: bool = False) -> list[dict[str, Any]]:
    """Read a COCO results list, refusing what would crash or mislead the tools that consume it.

    Args:
        path: a JSON list of result objects.
        allow_dataset: also accept a COCO dataset file and return its ``annotations`` (``data merge``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not a list of objects, or a result whose ``score``, ``bbox`` or polygon
            holds a non-finite or non-numeric value; the message names the file and the result index.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if isinstance(results, dict) and "annotations" in results:
        if not allow_dataset:
            raise ValueError(f"{path}: this is a COCO dataset file, not a results list; pass it as --data")
        results = results["annotations"]
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise ValueError(f"{path}: a COCO results file is a JSON list of objects")
    for i, result in enumerate(results):
        segm = result.get("segmentation")
        polygons = [v for poly in segm for v in poly] if isinstance(segm, list) and all(
            isinstance(p, list) for p in segm) else []
        values = [result.get("score", 0.0), *(result.get("bbox") or []), *polygons]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"{path}: result #{i} has a non-finite or non-numeric score, bbox or polygon value")
    return results


def _check_fields(pred: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and return ``(boxes float[N, 4], labels int64[N], scores float[N])`` on CPU."""
    for key in ("boxes", "labels", "scores"):
        if key not in pred:
            raise ValueError(f"prediction has no '{key}' field (got {sorted(pred)})")
    boxes = torch.as_tensor(pred["boxes"]).detach().to("cpu", torch.float32)
    labels = torch.as_tensor(pred["labels"]).detach().to("cpu", torch.int64).flatten()
    scores = torch.as_tensor(pred["scores"]).detach().to("cpu", torch.float32).flatten()
    n = len(labels)
    if boxes.numel() == 0 and n == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) != n or len(scores) != n:
        raise ValueError(
            f"prediction fields disagree: boxes {tuple(boxes.shape)} (want [N, 4]), "
            f"labels {tuple(labels.shape)}, scores {tuple(scores.shape)}"
        )
    return boxes, labels, scores


def _map_labels(labels: torch.Tensor, label_to_category_id: Sequence[int] | Mapping[int, int]) -> list[int]:
    """Category id of every label, checking all of them so a model/dataset mismatch fails loudly."""
    if isinstance(label_to_category_id, Mapping):
        table = {int(k): int(v) for k, v in label_to_category_id.items()}
    else:
        table = {i + 1: int(c) for i, c in enumerate(label_to_category_id)}
    unknown = sorted(set(labels.tolist()) - table.keys())
    if unknown:
        raise ValueError(
            f"label(s) {unknown} have no category id; known labels are {sorted(table)} "
            "(label 0 is background and never exported)"
        )
    return [table[label] for label in labels.tolist()]


def _encode_segmentations(
    pred: Mapping[str, torch.Tensor], boxes: torch.Tensor, order: torch.Tensor, threshold: float
) -> list[dict[str, Any]] | None:
    """RLEs of the detections at ``order`` from ``roi_masks`` or else ``masks``; None when box-only.

    Args:
        pred: the prediction (see :func:`prediction_to_coco`).
        boxes: its validated ``float32 [N, 4]`` CPU boxes.
        order: int64 indices of the detections to encode, in output order.
        threshold: foreground when a probability is strictly above it.
    """
    n = len(boxes)
    if pred.get("roi_masks") is not None:
        if pred.get("image_size") is None:
            raise ValueError(f"prediction has 'roi_masks' but no 'image_size' field (got {sorted(pred)})")
        rois = _squeeze_masks(pred["roi_masks"], n, "roi_masks")
        return roi_masks_to_rles(rois[order.to(rois.device)], boxes[order], pred["image_size"], threshold)
    if pred.get("masks") is not None:
        return _encode_masks(_squeeze_masks(pred["masks"], n, "masks"), order, threshold)
    return None


def _squeeze_masks(masks: torch.Tensor, n: int, key: str) -> torch.Tensor:
    """``[N, 1, A, B]`` or ``[N, A, B]`` -> ``[N, A, B]`` (no copy); ``key`` names the field in errors."""
    masks = torch.as_tensor(masks).detach()
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3 or masks.shape[0] != n:
        raise ValueError(f"prediction '{key}' has shape {tuple(masks.shape)}; want [{n}, 1, A, B] or [{n}, A, B]")
    return masks


def _encode_masks(masks: torch.Tensor, order: torch.Tensor, threshold: float) -> list[dict[str, Any]]:
    """Compressed RLEs of the masks at ``order`` (in that order), binarised at ``> threshold``.

    Args:
        masks: ``[N, H, W]`` probabilities (or {0, 1}), any dtype and device.
        order: int64 indices into ``masks``.
        threshold: foreground when a value is strictly above it.

    Returns:
        ``len(order)`` JSON-ready RLEs from one batched ``masks_to_rles`` call.
    """
    rows = order.sort().values  # ascending, so chunks are mostly plain slices (no float gather)
    n, h, w = len(rows), masks.shape[1], masks.shape[2]
    # W-major buffer: pycocotools wants column-major masks, so laid out like this the
    # transposed numpy view below is already Fortran-ordered and needs no second copy.
    binary = torch.empty((n, w, h), dtype=torch.uint8)
    for start in range(0, n, _MASK_CHUNK):
        idx = rows[start : start + _MASK_CHUNK]
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        block = masks[lo:hi] if hi - lo == len(idx) else masks[idx.to(masks.device)]
        # Threshold on the masks' device: only uint8 crosses to the CPU, a quarter of the float bytes.
        chunk = (block > threshold).to(torch.uint8).cpu()
        binary[start : start + len(idx)] = chunk.transpose(1, 2)
    rles = masks_to_rles(binary.numpy().transpose(0, 2, 1))
    position = {row: i for i, row in enumerate(rows.tolist())}
    return [rles[position[row]] for row in order.tolist()]
