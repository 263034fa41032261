"""``rsiseg predict``: COCO result JSON and overlay PNGs for image files, folders or a COCO list."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from rsiseg.data.io import match_bands, read_image, to_unit_float
from rsiseg.inference.export import prediction_to_coco, write_coco_results
from rsiseg.inference.predictor import load_model, predict_images
from rsiseg.inference.visualize import save_overlay, to_display_rgb

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def collect_images(inputs: list[str], from_coco: str | None, images_dir: str | None, limit: int | None) -> list[Path]:
    """Image paths from files, folders (sorted, non-recursive) and/or a COCO JSON's image list.

    Raises:
        FileNotFoundError: an input does not exist (named).
        ValueError: nothing to predict.
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if from_coco:
        root = Path(images_dir) if images_dir else Path(from_coco).parent
        paths += [root / img["file_name"] for img in json.loads(Path(from_coco).read_text())["images"]]
    if limit is not None:
        paths = paths[:limit]
    if not paths:
        raise ValueError("no images to predict: pass image files, folders or --from-coco")
    return paths


def run_predict(args: argparse.Namespace) -> int:
    """Predict every image; write ``predictions.json``, ``images.json`` and ``overlays/*.png``."""
    overrides = {"detections_per_img": args.max_detections} if args.max_detections else None
    loaded = load_model(args.checkpoint, args.device, overrides=overrides)
    paths = collect_images(args.inputs, args.from_coco, args.images, args.limit)
    out = Path(args.out)
    results, image_entries = [], []
    for start in tqdm(range(0, len(paths), args.batch_size), desc="predict", disable=args.quiet):
        batch = paths[start : start + args.batch_size]
        arrays = [to_unit_float(match_bands(read_image(p), loaded.config.model.in_channels, p)) for p in batch]
        tensors = [torch.from_numpy(a.transpose(2, 0, 1).copy()) for a in arrays]
        for offset, (path, image, pred) in enumerate(zip(batch, tensors, predict_images(loaded.model, tensors, loaded.device))):
            image_id = start + offset + 1
            image_entries.append({"id": image_id, "file_name": str(path), "height": image.shape[1], "width": image.shape[2]})
            found = prediction_to_coco(pred, image_id, loaded.label_to_category, score_threshold=args.score_threshold,
                                       max_detections=args.max_detections)
            results += found
            if not args.no_overlays:
                save_overlay(out / "overlays" / f"{path.stem}.png", to_display_rgb(image), pred, loaded.class_names,
                             score_threshold=args.score_threshold)
    write_coco_results(results, out / "predictions.json")
    categories = [{"id": c, "name": n} for c, n in zip(loaded.label_to_category, loaded.class_names)]
    (out / "images.json").write_text(json.dumps({"images": image_entries, "categories": categories}, indent=1))
    print(f"{len(results)} detections in {len(paths)} images (score >= {args.score_threshold})")
    print(f"wrote {out / 'predictions.json'}, {out / 'images.json'}"
          + ("" if args.no_overlays else f" and {out / 'overlays'}/"))
    return 0
