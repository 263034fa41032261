"""``rsiseg prompt``: a mask, a class and a score for each user box on one image.

The image is encoded once (:class:`~rsiseg.inference.predictor.Predictor`); each box then costs
only the RoI heads. Boxes come as ``x1,y1,x2,y2`` arguments and/or JSON files holding a list of
``[x1, y1, x2, y2]`` or ``{"boxes": [...]}``, in the image's pixels. Writes, into ``--out``:
``prompts.json`` (per box, in the given order: the prompt box, class, category id, score and a
COCO RLE mask) and ``prompts.png`` (the image with the masks, boxes and classes drawn). A previous
run is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rsiseg.commands.argtypes import unit_float
from rsiseg.fileio import atomic_write

OUTPUTS = ("prompts.json", "prompts.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="the image to segment")
    parser.add_argument("--checkpoint", required=True, help="a trained R-CNN checkpoint (any instance model)")
    parser.add_argument("--boxes", nargs="+", required=True, metavar="BOX",
                        help="x1,y1,x2,y2 in image pixels, or a JSON file with a list of boxes (or {\"boxes\": ...})")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--mask-threshold", type=unit_float, default=0.5, help="mask probability cut (default 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous prompt run in --out")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def parse_boxes(values: list[str]) -> list[list[float]]:
    """Box prompts from ``x1,y1,x2,y2`` strings and JSON files, in order.

    Raises:
        ValueError: an argument that is neither, naming it (and the file and entry for JSON).
    """
    boxes: list[list[float]] = []
    for value in values:
        if Path(value).suffix.lower() == ".json":
            boxes += _boxes_from_json(Path(value))
            continue
        parts = value.split(",")
        try:
            box = [float(p) for p in parts]
        except ValueError:
            box = []
        if len(box) != 4:
            raise ValueError(f"--boxes {value!r}: expected x1,y1,x2,y2 (four numbers) or a .json file")
        boxes.append(box)
    return boxes


def _boxes_from_json(path: Path) -> list[list[float]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--boxes {path}: cannot read it as JSON ({err})") from err
    entries = data.get("boxes") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"--boxes {path}: expected a list of [x1, y1, x2, y2] or an object with \"boxes\"")
    for i, box in enumerate(entries):
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise ValueError(f"--boxes {path}: boxes[{i}] is {box!r}, not [x1, y1, x2, y2]")
    return [[float(v) for v in box] for box in entries]


def run(args: argparse.Namespace) -> int:
    """Segment the boxes and write ``prompts.json`` and ``prompts.png``; returns 0."""
    from rsiseg.commands.predict import check_out_folder, staged_outputs
    from rsiseg.data.io import read_image
    from rsiseg.inference.predictor import Predictor
    from rsiseg.inference.visualize import save_overlay, to_display_rgb

    boxes = parse_boxes(args.boxes)
    out = Path(args.out)
    check_out_folder(out, args.overwrite, OUTPUTS)
    predictor = Predictor.from_checkpoint(args.checkpoint, args.device)
    image = read_image(args.image)
    result = predictor.segment(image, boxes=boxes)
    entries = prompt_entries(result, predictor.loaded.class_names, predictor.loaded.label_to_category,
                             args.mask_threshold)
    with staged_outputs(out, OUTPUTS) as staging:
        report = {"image": str(args.image), "checkpoint": str(args.checkpoint), "prompts": entries}
        atomic_write(staging / "prompts.json", lambda fh: fh.write(json.dumps(report, indent=1)))
        save_overlay(staging / "prompts.png", to_display_rgb(image), result, predictor.loaded.class_names,
                     score_threshold=0.0, mask_threshold=args.mask_threshold)
    for entry in entries:
        print(f"box {entry['prompt']}: {entry['class']} {entry['score']:.3f}, mask {entry['area']:.0f} px")
    print(f"wrote {out / 'prompts.json'} and {out / 'prompts.png'}")
    return 0


def prompt_entries(result: dict[str, Any], class_names: list[str], label_to_category: list[int],
                   mask_threshold: float) -> list[dict[str, Any]]:
    """One JSON-ready entry per prompt, in prompt order, with a full-image COCO RLE mask."""
    from rsiseg.inference.paste import roi_masks_to_rles
    from rsiseg.structures import rle_area

    rles = roi_masks_to_rles(result["roi_masks"], result["boxes"], tuple(result["image_size"].tolist()),
                             mask_threshold)
    return [
        {"prompt": k, "box": [round(v, 2) for v in box], "class": class_names[label - 1],
         "category_id": label_to_category[label - 1], "score": score, "segmentation": rle, "area": rle_area(rle)}
        for k, (box, label, score, rle) in enumerate(zip(result["boxes"].tolist(), result["labels"].tolist(),
                                                         result["scores"].tolist(), rles))
    ]
