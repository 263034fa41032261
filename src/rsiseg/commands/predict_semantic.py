"""``rsiseg predict`` for a semantic checkpoint: class-index maps and colour-coded masks.

Writes into ``--out``: ``masks/<stem>.png`` (``uint8`` class indices; ``<stem>.tif`` GeoTIFF with
the input's georeferencing when the input is a GeoTIFF), ``colour/<stem>.png`` (the class palette,
Potsdam's for its six classes) and ``images.json`` (per image: its outputs and the share of pixels
of each class). The input is resized as in training (``data.image_size``), and the class
probabilities are resized back to the input's size before the argmax.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rsiseg.commands.predict import (
    Inputs,
    check_out_folder,
    collect_images,
    decode_or_skip,
    predict_shard,
    report_skipped,
    shared_staging,
)
from rsiseg.data.io import match_bands, to_unit_float
from rsiseg.data.loader import to_chw_tensor
from rsiseg.data.semantic import resize_image
from rsiseg.engine.distributed import init_distributed, rank_device_name
from rsiseg.inference.fast import FastOptions
from rsiseg.inference.predictor import LoadedModel, model_from_state, predict_images
from rsiseg.inference.semantic_output import colorize, is_georeferenced, palette_for, write_index_mask

OUTPUTS = ("masks", "colour", "images.json")
_INSTANCE_ONLY = ("from_coco", "class_map", "max_detections")


def run_semantic_predict(args: argparse.Namespace, state: dict[str, Any]) -> int:
    """Predict every input with the semantic model in ``state`` (a loaded checkpoint)."""
    used = [f"--{name.replace('_', '-')}" for name in _INSTANCE_ONLY if getattr(args, name)]
    if used:
        raise ValueError(f"{', '.join(used)}: instance-task options; {args.checkpoint} is a semantic model")
    out = Path(args.out)
    dist = init_distributed(args.device)  # under torchrun: each process predicts every N-th image
    dist.main_only(lambda: check_out_folder(out, args.overwrite, OUTPUTS), "checking --out")
    found = collect_images(args.inputs, None, None, args.limit, args.strict)
    loaded = model_from_state(state, rank_device_name(dist, args.device), source=args.checkpoint,
                              fast=FastOptions.from_args(args))
    palette = palette_for(loaded.class_names, state.get("classes", {}).get("palette"))
    with shared_staging(out, OUTPUTS, dist) as staging:
        _, entries = predict_shard(found, dist, lambda part: ([], _predict_all(part, loaded, palette, staging,
                                                                               args.quiet or not dist.is_main)))
        if not dist.is_main:
            return 0
        (staging / "images.json").write_text(json.dumps(
            {"images": entries, "classes": loaded.class_names, "palette": [list(c) for c in palette],
             "skipped": [{"file_name": str(p), "reason": r} for p, r in found.skipped]}, indent=1))
    print(f"{len(entries)} images segmented into {len(loaded.class_names)} classes; wrote {out / 'masks'}/, "
          f"{out / 'colour'}/ and {out / 'images.json'}")
    report_skipped(found.skipped)
    return 0


def _predict_all(found: Inputs, loaded: LoadedModel, palette: list[tuple[int, int, int]], staging: Path,
                 quiet: bool) -> list[dict[str, Any]]:
    """Write each image's index and colour masks into ``staging``; returns the ``images.json`` entries."""
    cfg = loaded.config
    (staging / "masks").mkdir(exist_ok=True)  # every rank of a distributed run writes into one staging folder
    (staging / "colour").mkdir(exist_ok=True)
    entries = []
    for item in tqdm(found.images, desc="predict", disable=quiet):
        array = decode_or_skip(item, found)
        if array is None:
            continue
        image = to_unit_float(match_bands(array, cfg.model.in_channels, item.path))
        index = segment(loaded, image, cfg.data.image_size)
        georeferenced = is_georeferenced(item.path)
        mask_name = f"masks/{item.stem}.{'tif' if georeferenced else 'png'}"
        write_index_mask(staging / mask_name, index, item.path if georeferenced else None)
        colour_name = f"colour/{item.stem}.png"
        _write_png(staging / colour_name, colorize(index, palette))
        shares = np.bincount(index.ravel(), minlength=len(loaded.class_names)) / index.size
        entries.append({"id": item.image_id, "file_name": str(item.path), "height": int(index.shape[0]),
                        "width": int(index.shape[1]), "mask": mask_name, "colour": colour_name,
                        "class_share": {n: round(float(s), 4) for n, s in zip(loaded.class_names, shares)}})
    return entries


def segment(loaded: LoadedModel, image: np.ndarray, size: int | None) -> np.ndarray:
    """Class indices ``uint8 [H, W]`` of a ``float32 [H, W, C]`` image in [0, 1].

    The model sees the image as training did: resized to ``size`` squared when given. Its class
    probabilities are resized back to ``H x W`` before the argmax.
    """
    height, width = image.shape[:2]
    if size:
        image = resize_image(image, size)
    tensor = to_chw_tensor(image)
    probs = predict_images(loaded.model, [tensor], loaded.device)[0]["probs"]
    if probs.shape[-2:] != (height, width):
        probs = F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return probs.argmax(0).to(torch.uint8).numpy()


def _write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path)
