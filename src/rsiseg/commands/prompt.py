"""``rsiseg prompt``: a mask, a class and a score for each user prompt on one image.

The image is encoded once (:class:`~rsiseg.inference.predictor.Predictor`); each prompt then costs only
the heads. An R-CNN checkpoint takes box prompts; a PointSAM checkpoint takes point prompts and boxes.

- ``--boxes``: ``x1,y1,x2,y2`` arguments and/or JSON files holding a list of ``[x1, y1, x2, y2]`` or
  ``{"boxes": [...]}``, in the image's pixels; each box is one prompt.
- ``--points`` (PointSAM): ``x,y`` or ``x,y,label`` arguments (label 1 object, 0 background) and/or point
  files (the points JSON of ``rsiseg data points``, CSV ``image,x,y,class`` or GeoJSON points: the rows
  of this image's file name). Each object point is one prompt; background points join every point prompt.

Writes, into ``--out``: ``prompts.json`` (per prompt, in order: the prompt, class, category id, score
and a COCO RLE mask) and ``prompts.png`` (the image with the masks, boxes and classes drawn). A
previous run is replaced only with ``--overwrite``.
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
    parser.add_argument("--checkpoint", required=True,
                        help="a trained checkpoint: an R-CNN instance model (boxes) or PointSAM (points, boxes)")
    parser.add_argument("--boxes", nargs="+", metavar="BOX",
                        help="x1,y1,x2,y2 in image pixels, or a JSON file with a list of boxes (or {\"boxes\": ...}); "
                        "give IMAGE before --boxes, and a box that starts with a minus sign as --boxes=-5,10,60,70")
    parser.add_argument("--points", nargs="+", metavar="POINT",
                        help="PointSAM: x,y[,label] in image pixels (label 1 object, 0 background), or a points "
                        "JSON / CSV / GeoJSON file (the rows of this image)")
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
            hint = " (a file: give IMAGE before --boxes, whose values run to the next option)" \
                if Path(value).is_file() else ""
            raise ValueError(f"--boxes {value!r}: expected x1,y1,x2,y2 (four numbers) or a .json file{hint}")
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

    if not args.boxes and not args.points:
        raise ValueError("give the prompts: --boxes and/or --points")
    boxes = parse_boxes(args.boxes) if args.boxes else None
    out = Path(args.out)
    check_out_folder(out, args.overwrite, OUTPUTS)
    predictor = Predictor.from_checkpoint(args.checkpoint, args.device)
    image = read_image(args.image)
    loaded = predictor.loaded
    if predictor.takes_points:
        points = parse_points(args.points, Path(args.image).name) if args.points else None
        result, prompts = segment_points_and_boxes(predictor, image, points, boxes)
        entries = mask_entries(result, prompts, loaded.class_names, loaded.label_to_category, args.mask_threshold)
    else:
        if args.points:
            raise ValueError(f"{args.checkpoint}: model {loaded.config.model.name!r} takes box prompts only; "
                             "--points needs a PointSAM checkpoint")
        result = predictor.segment(image, boxes=boxes)
        entries = prompt_entries(result, loaded.class_names, loaded.label_to_category, args.mask_threshold)
    with staged_outputs(out, OUTPUTS) as staging:
        report = {"image": str(args.image), "checkpoint": str(args.checkpoint), "prompts": entries}
        atomic_write(staging / "prompts.json", lambda fh: fh.write(json.dumps(report, indent=1)))
        save_overlay(staging / "prompts.png", to_display_rgb(image), result, predictor.loaded.class_names,
                     score_threshold=0.0, mask_threshold=args.mask_threshold)
    for entry in entries:
        print(f"prompt {entry['prompt']}: {entry['class']} {entry['score']:.3f}, mask {entry['area']:.0f} px")
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


def parse_points(values: list[str], image_name: str) -> tuple[list[list[float]], list[list[float]]]:
    """Object and background points ``(x, y)`` from ``x,y[,label]`` strings and point files, in order.

    Raises:
        ValueError: an argument that is neither, or a label other than 0 and 1, naming it.
    """
    from rsiseg.data.instance_points import read_instance_points

    positive: list[list[float]] = []
    negative: list[list[float]] = []
    for value in values:
        if Path(value).suffix.lower() in (".json", ".csv", ".geojson"):
            found = read_instance_points(value)
            if image_name not in found:
                raise ValueError(f"--points {value}: no points for the image {image_name} (its images: "
                                 f"{', '.join(sorted(found)[:5])}{' ...' if len(found) > 5 else ''})")
            positive += [[float(x), float(y)] for x, y in found[image_name][0]]
            continue
        try:
            numbers = [float(p) for p in value.split(",")]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3) or (len(numbers) == 3 and numbers[2] not in (0.0, 1.0)):
            raise ValueError(f"--points {value!r}: expected x,y or x,y,label (label 1 object, 0 background) "
                             "or a .json/.csv/.geojson point file")
        (negative if len(numbers) == 3 and numbers[2] == 0 else positive).append(numbers[:2])
    if not positive:
        raise ValueError(f"--points: no object point (label 1) for {image_name}; background points alone are no prompt")
    return positive, negative


def segment_points_and_boxes(predictor: Any, image: Any, points: tuple[list, list] | None,
                             boxes: list[list[float]] | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A PointSAM's answers: one per object point (with every background point), then one per box.

    Returns:
        The answers concatenated (``masks`` ``[K, 1, H, W]``, ``scores``, ``boxes``, ``labels``) and each
        prompt as JSON (``points`` as ``[x, y, label]`` lists, or ``box``).
    """
    import torch

    answers, prompts = [], []
    predictor.set_image(image)  # encoded once; each segment() below reuses it (image=None)
    if points is not None:
        positive, negative = points
        coords = [[p, *negative] for p in positive]
        labels = [[1] + [0] * len(negative)] * len(positive)
        answers.append(predictor.segment(None, points=coords, point_labels=labels))
        prompts += [{"points": [[*xy, lab] for xy, lab in zip(c, ls)]} for c, ls in zip(coords, labels)]
    if boxes is not None:
        answers.append(predictor.segment(None, boxes=boxes))
        prompts += [{"box": box} for box in boxes]
    return {k: torch.cat([a[k] for a in answers]) for k in ("masks", "scores", "boxes", "labels")}, prompts


def mask_entries(result: dict[str, Any], prompts: list[dict[str, Any]], class_names: list[str],
                 label_to_category: list[int], mask_threshold: float) -> list[dict[str, Any]]:
    """One JSON-ready entry per prompt of a full-mask answer (PointSAM), with a COCO RLE mask.

    A user's point names no class: a one-class model's answers take its class, others ``null``."""
    import numpy as np

    from rsiseg.structures import mask_to_rle, rle_area

    single = len(class_names) == 1
    entries = []
    for k, (prompt, mask, score) in enumerate(zip(prompts, result["masks"][:, 0], result["scores"].tolist())):
        rle = mask_to_rle(np.ascontiguousarray((mask > mask_threshold).numpy()))
        entries.append({"prompt": k, **prompt, "class": class_names[0] if single else None,
                        "category_id": label_to_category[0] if single else None, "score": score,
                        "segmentation": rle, "area": rle_area(rle)})
    return entries
