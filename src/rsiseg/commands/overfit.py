"""``rsiseg overfit``: train on the first K training images until the model fits them, a debugging aid.

A model that cannot fit two images has a bug. This trains the config's model on the first K
images of its training data (augmentation off) and evaluates on the same images every E
iterations with the task's own evaluation, stopping when the headline metric (segm AP50 when
segm is evaluated, else bbox AP50; mIoU for the semantic task) reaches the target, or after N
iterations. Instance data: the K images are written as a COCO JSON ``OUT/subset.json``, used
for training and evaluation; semantic data: the K images train on their training labels (the
config's points) and are evaluated on their dense labels. The optimizer is the config's, at a
constant learning rate after at most 10 warmup iterations. Writes ``OUT/overfit.json`` (each
evaluation's iteration, mean losses and metrics; reached, iterations, seconds) and
``OUT/gt_vs_pred/<stem>.png`` (ground truth beside the predictions). Exits 0 when the target was
reached, 1 when not.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsiseg.commands.argtypes import int_in_range, unit_float
from rsiseg.config import ExperimentConfig, apply_overrides, load_config
from rsiseg.fileio import atomic_write

if TYPE_CHECKING:  # the command line imports this module for --help: no torch at import time
    from rsiseg.tasks.base import Task, TaskDataset

log = logging.getLogger(__name__)

# Augmentation and the training-set filters off: the model must fit exactly the images it is evaluated on.
EXACT_IMAGES = ["data.hflip=0", "data.vflip=0", "data.rot90=0", "data.color_jitter=0", "data.scale_range=[1, 1]",
                "data.max_instances=null", "data.max_empty_fraction=null"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.add_argument("--images", type=int_in_range(1), default=2, metavar="K",
                        help="how many of the first training images to fit (default 2)")
    parser.add_argument("--iters", type=int_in_range(1), default=300, metavar="N",
                        help="iterations at most (default 300)")
    parser.add_argument("--target", type=unit_float, default=0.9, metavar="T",
                        help="stop when the headline metric reaches this (default 0.9)")
    parser.add_argument("--eval-every", type=int_in_range(1), default=25, metavar="E",
                        help="iterations between evaluations on the K images (default 25)")
    parser.add_argument("--metric", help="stop on this '<group>/<stat>' metric instead of the headline one")
    parser.add_argument("--score-threshold", type=unit_float, default=0.5,
                        help="instance detections below this score are not drawn in the figures (default 0.5)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")


def run(args: argparse.Namespace) -> int:
    import torch

    from rsiseg.engine.overfit import headline_metric, overfit
    from rsiseg.engine.preflight import preflight
    from rsiseg.engine.trainer import seed_everything
    from rsiseg.inference.predictor import select_device
    from rsiseg.models.registry import build_model
    from rsiseg.tasks import get_task

    out = Path(args.out)
    cfg = apply_overrides(load_config(args.config, args.overrides), EXACT_IMAGES, source=f"{args.config} for overfit")
    # Nothing of a run is written (no checkpoints, no logs): OUT only holds the overfit's own files.
    cfg = replace(cfg, train=replace(cfg.train, output_dir=str(out), tensorboard=False, wandb=False))
    preflight(cfg, overwrite=True)  # registry, task, metric names, device: the checks `train` makes
    task = get_task(cfg.task)
    metric = args.metric or headline_metric(task, cfg)
    if metric not in task.metric_names(cfg):
        raise ValueError(f"--metric {metric!r} is not one of the {cfg.task} task's metrics: "
                         f"{', '.join(task.metric_names(cfg))}")
    cfg, train_set, eval_set = first_images(cfg, task, args.images, out)
    device = select_device(cfg.train.device)
    seed_everything(cfg.train.seed)  # before the model is built: its initial weights are drawn here
    items = [train_set[i] for i in range(len(train_set))]  # read once: without augmentation they never change
    model = build_model(cfg.model).to(device)
    result = overfit(model, task, cfg, items, eval_set, device, max_iters=args.iters, target=args.target,
                     eval_every=args.eval_every, metric=metric, progress=not getattr(args, "quiet", False))
    names = image_names(eval_set)
    figures = write_figures(model, eval_set, names, out / "gt_vs_pred", device, args.score_threshold)
    record = {"config": str(args.config), "overrides": list(args.overrides), "model": cfg.model.name,
              "task": cfg.task, "images": names, "metric": metric, "target": args.target,
              "reached": result.reached, "iterations": result.iterations, "seconds": round(result.seconds, 3),
              "final": _json_number(result.last_value), "skipped_batches": result.skipped_batches,
              "diverged": result.diverged,
              "device": str(device), "torch": torch.__version__, "evals": result.evals}
    text = json.dumps(record, indent=1, allow_nan=False) + "\n"
    atomic_write(out / "overfit.json", lambda fh: fh.write(text))
    value = f"{result.last_value:.4f}"
    where = f"{result.iterations} iterations, {result.seconds:.1f} s; {len(figures)} figures in {out / 'gt_vs_pred'}"
    if result.reached:
        print(f"overfit: reached {metric} = {value} >= {args.target:g} on {len(names)} images of "
              f"{cfg.model.name} after {where}")
        return 0
    why = f" (diverged: {result.skipped_batches} non-finite losses; try a lower train.lr)" if result.diverged else ""
    print(f"overfit: NOT reached: {metric} = {value} < {args.target:g} on {len(names)} images of "
          f"{cfg.model.name} after {where}{why}")
    return 1


def first_images(cfg: ExperimentConfig, task: Task, count: int, out: Path
                 ) -> tuple[ExperimentConfig, TaskDataset, TaskDataset]:
    """The config, training set and evaluation set of the first ``count`` training images.

    Instance data (``data.train_ann``): the images come first in the JSON's order; they and their
    annotations are written to ``out/subset.json``, which becomes the training and validation
    file of the returned config. Semantic data: the images come first by name; the evaluation set
    reads the same images with their dense labels. Both sets come from ``task.build_datasets``,
    so classes are checked and read exactly as in training.

    Raises:
        ValueError: the training data has fewer than ``count`` images.
    """
    data = cfg.data
    if data.train_points:
        raise ValueError("overfit scores the model against the training masks: data.train_points has points only; "
                         "use a config with data.train_ann")
    if data.train_ann:
        if not data.train_images:
            raise ValueError("data.train_ann and data.train_images must be set to overfit")
        subset = _coco_subset(data.train_ann, data.train_images, data.repair, count)
        atomic_write(out / "subset.json", lambda fh: fh.write(json.dumps(subset)))
        path = str(out / "subset.json")
        cfg = replace(cfg, data=replace(data, train_ann=path, val_ann=path, val_images=data.train_images))
        train_set, eval_set = task.build_datasets(cfg)
        return cfg, train_set, eval_set
    cfg = replace(cfg, data=replace(data, val_images=data.train_images, val_labels=data.train_labels))
    train_set, eval_set = task.build_datasets(cfg)
    if len(train_set) < count:
        raise ValueError(f"--images {count} but {data.train_images} holds {len(train_set)} images")
    return cfg, _first(train_set, count), _first(eval_set, count)


def _coco_subset(ann_file: str, image_dir: str, repair: bool, count: int) -> dict[str, Any]:
    """The checked COCO dict of the first ``count`` images of ``ann_file``, every category kept."""
    from rsiseg.data.coco_index import load_coco_index

    index = load_coco_index(ann_file, image_dir, repair=repair)
    if len(index.images) < count:
        raise ValueError(f"--images {count} but {ann_file} holds {len(index.images)} usable images")
    images = index.images[:count]
    annotations = [ann for image in images for ann in index.anns_by_image[image["id"]]]
    if not any(not ann.get("iscrowd") for ann in annotations):
        log.warning("the first %d images of %s hold no instances: there is nothing to fit", count, ann_file)
    return {"images": images, "annotations": annotations, "categories": index.categories}


def _first(dataset: Any, count: int) -> Any:
    """A copy of a folder dataset that sees only its first ``count`` images (its classes unchanged)."""
    view = copy.copy(dataset)
    view.image_paths = dataset.image_paths[:count]
    if dataset.label_paths is not None:
        view.label_paths = dataset.label_paths[:count]
    return view


def image_names(dataset: Any) -> list[str]:
    """File names of a dataset's images, in item order (folder datasets and COCO datasets)."""
    if hasattr(dataset, "names"):
        return list(dataset.names)
    return [image["file_name"] for image in dataset.index.images]


def write_figures(model: Any, dataset: Any, names: list[str], folder: Path, device: Any,
                  score_threshold: float) -> list[Path]:
    """``folder/<stem>.png`` per image: ground truth beside the model's predictions.

    Instance predictions (``boxes``) are drawn over the image for both sides; dense predictions
    (a ``labels`` map) show the input, the ground-truth colours and the predicted colours.
    """
    from rsiseg.inference.predictor import predict_images

    written, stems = [], set()
    for idx, name in enumerate(names):
        image, target = dataset[idx]
        if "points" in target:  # a prompted model answers the instances' own points
            pred = predict_images(model, [image], device, [{"points": target["points"], "labels": target["labels"]}])[0]
        else:
            pred = predict_images(model, [image], device)[0]
        stem = Path(name).stem if Path(name).stem not in stems else f"{Path(name).stem}_{idx}"
        stems.add(stem)
        panels = (_instance_panels(image, target, pred, dataset.class_names, score_threshold) if "boxes" in pred
                  else _dense_panels(image, target, pred, dataset))
        figure = side_by_side(panels)
        written.append(atomic_write(folder / f"{stem}.png", lambda fh: figure.save(fh, format="PNG"), binary=True))
    return written


def _instance_panels(image: Any, target: dict[str, Any], pred: dict[str, Any], class_names: list[str],
                     score_threshold: float) -> list[tuple[str, Any]]:
    from rsiseg.inference.visualize import draw_instances

    truth = {"boxes": target["boxes"], "labels": target["labels"], "masks": target["masks"].to_full()}
    shown = int((pred["scores"] >= score_threshold).sum())
    return [(f"ground truth ({len(target['labels'])})", draw_instances(image, truth, class_names)),
            (f"prediction ({shown} >= {score_threshold:g})",
             draw_instances(image, pred, class_names, score_threshold=score_threshold))]


def _dense_panels(image: Any, target: dict[str, Any], pred: dict[str, Any], dataset: Any) -> list[tuple[str, Any]]:
    from rsiseg.inference.display import to_display_rgb
    from rsiseg.inference.semantic_output import colorize, palette_for

    palette = palette_for(dataset.class_names, getattr(dataset, "palette", None))
    return [("input", to_display_rgb(image)), ("ground truth", colorize(target["labels"].numpy(), palette)),
            ("prediction", colorize(pred["labels"].numpy(), palette))]


def side_by_side(panels: list[tuple[str, Any]], min_side: int = 256) -> Any:
    """One RGB PIL image of ``uint8 [H, W, 3]`` panels in a row, each under its title.

    Panels whose short side is under ``min_side`` are enlarged by a whole factor (nearest
    neighbour, so label boundaries stay sharp): 64 px tiles are unreadable otherwise.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    height, width = panels[0][1].shape[:2]
    scale = max(1, math.ceil(min_side / min(height, width)))
    pad, title_h = 8, 22
    canvas = Image.new("RGB", (pad + len(panels) * (width * scale + pad), title_h + height * scale + pad),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (title, array) in enumerate(panels):
        x = pad + i * (width * scale + pad)
        draw.text((x, 5), title, fill=(0, 0, 0))
        panel = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
        canvas.paste(panel.resize((width * scale, height * scale), Image.NEAREST), (x, title_h))
    return canvas


def _json_number(value: float) -> float | None:
    return None if not math.isfinite(value) else value

