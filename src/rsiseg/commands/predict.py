"""``rsiseg predict``: COCO result JSON and overlay PNGs for image files, folders or a COCO list."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from rsiseg.data.coco_index import read_coco_json
from rsiseg.data.io import match_bands, read_image, to_unit_float
from rsiseg.inference.classes import map_labels_to_categories, parse_class_map
from rsiseg.inference.export import prediction_to_coco, write_coco_results
from rsiseg.inference.predictor import load_model, predict_images
from rsiseg.inference.visualize import save_overlay, to_display_rgb

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def collect_images(
    inputs: list[str], from_coco: str | None, images_dir: str | None, limit: int | None,
) -> list[tuple[Path, int]]:
    """``(path, image id)`` of files, folders (sorted, non-recursive) and/or a COCO JSON's images.

    Images listed by ``from_coco`` keep that JSON's ids; the others are numbered after them.

    Raises:
        FileNotFoundError: an input does not exist (named).
        ValueError: nothing to predict, or a negative ``limit``.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    entries: list[tuple[Path, int]] = []
    if from_coco:
        root = Path(images_dir) if images_dir else Path(from_coco).parent
        entries += [(root / img["file_name"], int(img["id"])) for img in read_coco_json(Path(from_coco))["images"]]
    next_id = max((i for _, i in entries), default=0) + 1
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found = [path]
        else:
            raise FileNotFoundError(f"input not found: {path}")
        entries += [(p, next_id + k) for k, p in enumerate(found)]
        next_id += len(found)
    if limit is not None:
        entries = entries[:limit]
    if not entries:
        raise ValueError("no images to predict: pass image files, folders or --from-coco")
    return entries


def run_predict(args: argparse.Namespace) -> int:
    """Predict every image; write ``predictions.json``, ``images.json`` and ``overlays/*.png``."""
    overrides = {"detections_per_img": args.max_detections} if args.max_detections else None
    loaded = load_model(args.checkpoint, args.device, overrides=overrides)
    entries = collect_images(args.inputs, args.from_coco, args.images, args.limit)
    categories = [{"id": c, "name": n} for c, n in zip(loaded.label_to_category, loaded.class_names)]
    label_to_category = loaded.label_to_category
    if args.from_coco:  # results are scored against this JSON: use its category ids
        categories = read_coco_json(Path(args.from_coco))["categories"]
        label_to_category = map_labels_to_categories(
            loaded.class_names, loaded.label_to_category, categories, parse_class_map(args.class_map),
            model_source=str(args.checkpoint), data_source=str(args.from_coco))
    out = Path(args.out)
    results, image_entries = [], []
    for start in tqdm(range(0, len(entries), args.batch_size), desc="predict", disable=args.quiet):
        batch = entries[start : start + args.batch_size]
        arrays = [to_unit_float(match_bands(read_image(p), loaded.config.model.in_channels, p)) for p, _ in batch]
        tensors = [torch.from_numpy(a.transpose(2, 0, 1).copy()) for a in arrays]
        for (path, image_id), image, pred in zip(batch, tensors, predict_images(loaded.model, tensors, loaded.device)):
            image_entries.append({"id": image_id, "file_name": str(path), "height": image.shape[1], "width": image.shape[2]})
            found = prediction_to_coco(pred, image_id, label_to_category, score_threshold=args.score_threshold,
                                       max_detections=args.max_detections)
            results += found
            if not args.no_overlays:
                save_overlay(out / "overlays" / f"{path.stem}.png", to_display_rgb(image), pred, loaded.class_names,
                             score_threshold=args.score_threshold)
    write_coco_results(results, out / "predictions.json")
    (out / "images.json").write_text(json.dumps({"images": image_entries, "categories": categories}, indent=1))
    print(f"{len(results)} detections in {len(entries)} images (score >= {args.score_threshold})")
    print(f"wrote {out / 'predictions.json'}, {out / 'images.json'}"
          + ("" if args.no_overlays else f" and {out / 'overlays'}/"))
    return 0
