"""``rsiseg explain``: Grad-CAM of each detected instance's class score, as overlays beside the predictions.

For every image, the model detects (scores >= ``--score-threshold``, at most ``--max-instances``,
best first); each detection's pre-softmax class logit is then traced back to the feature map
``--layer`` with Grad-CAM (see :mod:`rsiseg.tools.gradcam`). Writes, into ``--out``:
``explain/<stem>_<k>_<class>.png`` (the image with instance k's heat map blended in and its box
drawn; k counts from 0, best score first), ``explain/<stem>_grid.png`` (every instance's map,
tiled and captioned with class and score) and ``explain.json`` (per image: the layer, and per
instance its box, label, class name, score, logit and file). ``--out`` may be a ``predict``
output folder: only ``explain/`` and ``explain.json`` are written there, all at once when every
image is done, and a previous explain run is replaced only with ``--overwrite``.

The default layer ``fpn`` explains each instance at the FPN level its box is pooled from: the
box head reads one level per box (chosen by the box size), so a fixed level such as ``fpn:0``
leaves blank maps for boxes pooled elsewhere. ``--list-layers`` prints the choices.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rsiseg.commands.argtypes import int_in_range, unit_float
from rsiseg.fileio import atomic_write

if TYPE_CHECKING:  # torch-heavy: imported for annotations only
    from rsiseg.inference.predictor import LoadedModel

log = logging.getLogger(__name__)

OUTPUTS = ("explain", "explain.json")  # what a run writes into --out; --overwrite replaces exactly these
_TILE = 256  # longest side of one grid tile, px
_MAX_COLUMNS = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="IMAGE", help="image files or folders (not searched recursively)")
    parser.add_argument("--checkpoint", required=True, help="a trained instance segmentation checkpoint")
    parser.add_argument("--layer", default="fpn",
                        help="feature map to explain: fpn (default: each instance's own pooled FPN level), "
                             "fpn:<level>, or a backbone module such as backbone.body.<stage>; see --list-layers")
    parser.add_argument("--list-layers", action="store_true", help="print the model's layers and exit")
    parser.add_argument("--score-threshold", type=unit_float, default=0.3,
                        help="explain detections scoring at least this, in [0, 1] (default 0.3)")
    parser.add_argument("--max-instances", type=int_in_range(1), default=20,
                        help="explain at most this many per image, best first (default 20)")
    parser.add_argument("--out", metavar="DIR", help="output folder (required, except with --list-layers)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous explain run in --out")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def run(args: argparse.Namespace) -> int:
    """Explain every image; returns 0, or 130 when interrupted (with nothing written).

    Raises:
        ValueError: a model without RoI heads, an unknown ``--layer`` (valid ones listed), no
            ``--out`` or no inputs.
        OSError: unreadable inputs or checkpoint, or an ``--out`` holding a previous run.
    """
    from rsiseg.inference.predictor import load_model
    from rsiseg.tools.gradcam import check_layer, layer_names

    if not args.list_layers and not args.out:  # refused before the model loads
        raise ValueError("--out is required (except with --list-layers)")
    if not args.list_layers and not args.inputs:
        raise ValueError("no images to explain: pass image files or folders")
    loaded = load_model(args.checkpoint, args.device)
    if args.list_layers:
        print("\n".join(layer_names(loaded.model)))  # refuses a model without RoI heads
        return 0
    check_layer(loaded.model, args.layer)  # before anything is written
    try:
        return _explain_all(loaded, args)
    except KeyboardInterrupt:
        print("rsiseg explain: interrupted; nothing was written", file=sys.stderr)
        return 130


def _explain_all(loaded: LoadedModel, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rsiseg.commands.predict import check_out_folder, collect_images, decode_or_skip, report_skipped, staged_outputs
    from rsiseg.data.io import match_bands, to_unit_float
    from rsiseg.data.loader import to_chw_tensor
    from rsiseg.tools.gradcam import instance_cams

    out = Path(args.out)
    found = collect_images(args.inputs, None, None, None)
    check_out_folder(out, args.overwrite, OUTPUTS)
    entries: list[dict[str, Any]] = []
    with staged_outputs(out, OUTPUTS) as staging:
        for item in tqdm(found.images, desc="explain", disable=getattr(args, "quiet", False)):
            array = decode_or_skip(item, found)
            if array is None:
                continue
            array = to_unit_float(match_bands(array, loaded.config.model.in_channels, item.path))
            image = to_chw_tensor(array)
            detections, cams = instance_cams(loaded.model, image.to(loaded.device), args.layer,
                                             score_threshold=args.score_threshold, max_instances=args.max_instances)
            entries.append({"file_name": str(item.path), "layer": args.layer,
                            **write_image(staging, item.stem, image, detections, cams, loaded.class_names)})
        report = {"checkpoint": str(args.checkpoint), "layer": args.layer, "score_threshold": args.score_threshold,
                  "max_instances": args.max_instances, "images": entries,
                  "skipped": [{"file_name": str(p), "reason": r} for p, r in found.skipped]}
        atomic_write(staging / "explain.json", lambda fh: fh.write(json.dumps(report, indent=1)))
    _report(entries, args.layer, args.score_threshold)
    report_skipped(found.skipped)
    print(f"wrote {out / 'explain.json'}" + (f" and {out / 'explain'}/" if (out / "explain").is_dir() else ""))
    return 0


def write_image(folder: Path, stem: str, image: Any, detections: dict[str, Any], cams: Any,
                class_names: list[str]) -> dict[str, Any]:
    """Write one image's overlays and grid under ``folder/explain``; returns its ``explain.json`` entry.

    Args:
        folder: the output (or staging) folder.
        stem: the image's name without suffix, unique among the run's images.
        image: float ``[C, H, W]`` in [0, 1].
        detections: as returned by :func:`rsiseg.tools.gradcam.instance_cams` (``[N]`` per field).
        cams: float ``[N, H, W]`` in [0, 1].
        class_names: ``class_names[i]`` names label ``i + 1``.
    """
    from rsiseg.inference.visualize import draw_instances, to_display_rgb
    from rsiseg.tools.gradcam import heatmap_overlay

    rgb = to_display_rgb(image)
    instances, tiles = [], []
    for k in range(len(cams)):
        label, score = int(detections["labels"][k]), float(detections["scores"][k])
        name = class_names[label - 1] if 1 <= label <= len(class_names) else f"class_{label}"
        file = f"explain/{stem}_{k}_{_safe(name)}.png"
        one = {key: detections[key][k : k + 1] for key in ("boxes", "labels", "scores")}
        overlay = draw_instances(heatmap_overlay(rgb, cams[k].numpy()), one, class_names, show_legend=False)
        _save_png(folder / file, overlay)
        tiles.append((overlay, f"{k}: {name} {score:.2f}"))
        instances.append({"index": k, "box": [round(float(v), 2) for v in detections["boxes"][k]], "label": label,
                          "class_name": name, "score": round(score, 4),
                          "logit": round(float(detections["logits"][k]), 4),
                          "blank": bool(detections["peaks"][k] <= 0), "file": file})
    grid = f"explain/{stem}_grid.png" if tiles else None
    if grid:
        _save_png(folder / grid, tile_grid(tiles))
    return {"height": int(image.shape[-2]), "width": int(image.shape[-1]), "grid": grid, "instances": instances}


def tile_grid(tiles: list[tuple[np.ndarray, str]], tile: int = _TILE) -> np.ndarray:
    """Tile ``uint8[H, W, 3]`` images, each scaled to fit ``tile`` px, with its caption below.

    Returns:
        ``uint8`` RGB, at most 5 tiles a row, on a dark background.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    caption = 22
    columns = min(_MAX_COLUMNS, math.ceil(math.sqrt(len(tiles))))
    rows = math.ceil(len(tiles) / columns)
    canvas = Image.new("RGB", (columns * (tile + 4), rows * (tile + caption + 4)), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    for i, (pixels, text) in enumerate(tiles):
        x, y = (i % columns) * (tile + 4) + 2, (i // columns) * (tile + caption + 4) + 2
        thumb = Image.fromarray(pixels)
        scale = tile / max(thumb.size)
        thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
                             Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR)
        canvas.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        draw.text((x + 2, y + tile + 3), text, font=font, fill=(255, 255, 255))
    return np.asarray(canvas)


def _report(entries: list[dict[str, Any]], layer: str, score_threshold: float) -> None:
    """Print the counts, and warn about blank maps with their likely cause."""
    instances = [inst for entry in entries for inst in entry["instances"]]
    print(f"explained {len(instances)} instances in {len(entries)} images at layer {layer}")
    empty = sum(not entry["instances"] for entry in entries)
    if empty:
        print(f"{empty} images had no detection scoring >= {score_threshold:g}; lower --score-threshold to explain "
              "weaker ones")
    blank = sum(inst["blank"] for inst in instances)
    if blank:
        hint = (" (with a fixed FPN level, boxes pooled from another level get no gradient there: try --layer fpn)"
                if layer.startswith("fpn:") else "")
        log.warning("%d of %d maps are blank: no activation of %s raises their class logit%s", blank,
                    len(instances), layer, hint)


def _save_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    atomic_write(path, lambda fh: Image.fromarray(pixels).save(fh, format="PNG"), binary=True)


def _safe(name: str) -> str:
    """A class name usable in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "class"
