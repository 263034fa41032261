"""``rsiseg eval``: a checkpoint's metrics on a dataset (its task's), or COCO metrics of a results file."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from rsiseg.checkpoint import load_checkpoint
from rsiseg.commands.predict_tiled import parse_bands, predict_coco_scenes, tile_options, warn_if_resized
from rsiseg.config import EvalConfig, ExperimentConfig, load_config
from rsiseg.data.coco import CocoInstanceDataset
from rsiseg.data.coco_index import read_coco_json
from rsiseg.engine.distributed import init_distributed, rank_device_name
from rsiseg.evaluation.coco import evaluate_coco, format_metrics_table
from rsiseg.evaluation.metrics import write_metrics
from rsiseg.evaluation.prompted import evaluate_with_missed_prompts, format_prompted_table
from rsiseg.fileio import atomic_write
from rsiseg.inference.classes import map_labels_to_categories, parse_class_map
from rsiseg.inference.export import read_coco_results, write_coco_results
from rsiseg.inference.fast import FastOptions
from rsiseg.inference.predictor import LoadedModel, model_from_state, score_results, select_device, stored_config
from rsiseg.models.registry import build_model
from rsiseg.tasks import get_task
from rsiseg.tasks.instance import predict_sharded


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint (``--checkpoint``) or a results file (``--predictions``); write the metrics."""
    if sum(bool(x) for x in (args.checkpoint, args.predictions, args.config)) != 1:
        raise ValueError("pass one of --checkpoint CKPT.pth, --predictions RESULTS.json (with --data GT.json) or "
                         "--config CONFIG.yaml (a prompted model as its config builds it, e.g. zero-shot SAM)")
    if args.config:
        return _eval_prompted(args, None, load_config(args.config))
    if args.predictions:
        if args.prompt_missed:
            raise ValueError("--prompt-missed prompts a model: pass --checkpoint CKPT.pth, not --predictions")
        return _score_predictions(args)
    state = load_checkpoint(args.checkpoint)
    cfg = stored_config(state, args.checkpoint)
    if cfg.task == "semantic":
        return _eval_semantic(args, state, cfg)
    if cfg.task == "prompted":
        return _eval_prompted(args, state, cfg)
    ann = args.data or cfg.data.val_ann
    if not ann:
        raise ValueError(f"{args.checkpoint}: its config has no data.val_ann; pass --data ANNOTATIONS.json")
    images = args.images or (cfg.data.val_images if not args.data else None) or str(Path(ann).parent)
    eval_cfg = _eval_settings(cfg.eval, args)
    top = eval_cfg.max_dets[-1] if eval_cfg.max_dets else (1000 if eval_cfg.preset == "isaid" else 100)
    # The model must be allowed to return as many detections as the metric counts.
    overrides = {"detections_per_img": min(top, 1000)} if top > cfg.model.detections_per_img else None
    if args.tiled:
        return _eval_tiled(args, state, overrides, ann, images, eval_cfg)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if args.prompt_missed and processes > 1:
        raise ValueError(f"--prompt-missed runs in one process, but torchrun started {processes}: "
                         "run `rsiseg eval --prompt-missed` without torchrun")
    dataset = CocoInstanceDataset(ann, images, in_channels=cfg.model.in_channels, repair=cfg.data.repair)
    dist = init_distributed(args.device)  # under torchrun: each process predicts every N-th image
    loaded = model_from_state(state, rank_device_name(dist, args.device), overrides, source=args.checkpoint,
                              fast=FastOptions.from_args(args))
    label_to_category = map_labels_to_categories(
        loaded.class_names, loaded.label_to_category, dataset.index.categories, parse_class_map(args.class_map),
        model_source=str(args.checkpoint), data_source=str(ann),
    )
    if args.prompt_missed:
        return _eval_missed_prompts(args, loaded, dataset, eval_cfg, label_to_category, ann)
    results = predict_sharded(loaded.model, dataset, eval_cfg, loaded.device, dist,
                              progress=not args.quiet and dist.is_main, label_to_category=label_to_category)
    if not dist.is_main:
        return 0
    metrics = score_results(dataset, results, eval_cfg)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    _write_outputs(out, metrics, f"{Path(args.checkpoint).name} on {ann}", format_metrics_table(metrics), results)
    print(dataset.summary())
    return 0


def _eval_tiled(args: argparse.Namespace, state: dict[str, Any], overrides: dict[str, Any] | None, ann: str,
                images: str, eval_cfg: EvalConfig) -> int:
    """COCO metrics of tiled, merged whole-scene predictions against the scene-level ground truth."""
    if args.prompt_missed:
        raise ValueError("--prompt-missed and --tiled cannot be combined")
    options = tile_options(args, score_threshold=0.0)  # AP ranks every detection the model returns
    coco = read_coco_json(Path(ann))
    dist = init_distributed(args.device)  # under torchrun: each process predicts every N-th scene
    loaded = model_from_state(state, rank_device_name(dist, args.device), overrides, source=args.checkpoint,
                              fast=FastOptions.from_args(args))
    loaded.label_to_category = map_labels_to_categories(
        loaded.class_names, loaded.label_to_category, coco["categories"], parse_class_map(args.class_map),
        model_source=str(args.checkpoint), data_source=str(ann))
    warn_if_resized(loaded, options)
    results = predict_coco_scenes(loaded, coco, Path(images), options, parse_bands(args.bands),
                                  not args.quiet and dist.is_main, dist)
    if not dist.is_main:
        return 0
    metrics = evaluate_coco(ann, results, iou_types=("bbox", "segm"), preset=eval_cfg.preset,
                            max_dets=tuple(eval_cfg.max_dets) if eval_cfg.max_dets else None)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval_tiled"
    title = f"{Path(args.checkpoint).name} on {ann}, tiled {options.size} px / {options.overlap} px overlap"
    _write_outputs(out, metrics, title, format_metrics_table(metrics), results)
    return 0


def _eval_prompted(args: argparse.Namespace, state: dict[str, Any] | None, cfg: ExperimentConfig) -> int:
    """Every instance prompted by its point: mIoU, mask AP and point-to-box AP of a checkpoint, or of the model a
    config builds (``--config``: SAM with the official weights of ``model.sam.checkpoint``, the zero-shot row)."""
    if cfg.task != "prompted":
        raise ValueError(f"--config evaluates a prompted model (task: prompted); {args.config} has task {cfg.task!r}")
    if args.class_map or args.prompt_missed or args.tiled:
        raise ValueError("--class-map, --prompt-missed and --tiled apply to the instance task, not a prompted model")
    ann = args.data or cfg.data.val_ann
    if not ann:
        raise ValueError(f"{args.checkpoint or args.config}: its config has no data.val_ann; pass --data GT.json")
    images = args.images or (cfg.data.val_images if not args.data else None) or str(Path(ann).parent)
    cfg = replace(cfg, eval=_eval_settings(cfg.eval, args))
    task = get_task("prompted")
    dataset = task.dataset(cfg, ann, images)
    dist = init_distributed(args.device)  # under torchrun: each process prompts every N-th image
    device = select_device(rank_device_name(dist, args.device))
    if args.precision != "fp32" or args.compile:
        raise ValueError("--precision and --compile apply to instance and semantic models; a prompted model runs "
                         "unchanged")
    if state is not None:
        model = model_from_state(state, str(device), source=args.checkpoint).model
    else:
        model = build_model(cfg.model).to(device).eval()
    results = task.answers(model, dataset, cfg, device, dist, progress=not args.quiet and dist.is_main)
    if not dist.is_main:
        return 0
    metrics = task.score(dataset, results, cfg)
    source = Path(args.checkpoint or args.config)
    # A config's folder is the repository's configs/: the zero-shot figures go to the run's folder instead.
    default = source.parent / "eval" if args.checkpoint else Path(cfg.train.output_dir) / "zero_shot"
    out = Path(args.out) if args.out else default
    _write_outputs(out, metrics, f"{source.name} on {ann}, one point per instance", task.format_metrics(metrics),
                   results)
    print(dataset.summary())
    return 0


def _eval_semantic(args: argparse.Namespace, state: dict[str, Any], cfg: ExperimentConfig) -> int:
    """Accuracy and IoU of a semantic checkpoint on dense labels: ``--data LABELS_DIR`` or its validation split."""
    if args.predictions or args.class_map or args.preset or args.max_dets or args.prompt_missed:
        raise ValueError("--predictions, --class-map, --preset, --max-dets and --prompt-missed apply to the instance "
                         f"task; {args.checkpoint} is a semantic model")
    labels = args.data or cfg.data.val_labels
    if not labels:
        raise ValueError(f"{args.checkpoint}: its config has no data.val_labels; pass --data LABELS_DIR "
                         "(and --images IMAGES_DIR)")
    images = args.images or (cfg.data.val_images if not args.data else None)
    if not images:
        raise ValueError("--data LABELS_DIR needs --images IMAGES_DIR, the images those labels belong to")
    task = get_task("semantic")
    dataset = task.dataset(cfg, images, labels)
    dist = init_distributed(args.device)  # under torchrun: each process evaluates every N-th image
    loaded = model_from_state(state, rank_device_name(dist, args.device), source=args.checkpoint,
                              fast=FastOptions.from_args(args))
    if list(loaded.class_names) != list(dataset.class_names):
        raise ValueError(f"{args.checkpoint} predicts the classes {loaded.class_names} but the labels in {labels} "
                         f"have {dataset.class_names}")
    metrics = task.evaluate(loaded.model, dataset, cfg, loaded.device, progress=not args.quiet and dist.is_main,
                            dist=dist)
    if not dist.is_main:
        return 0
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    _write_outputs(out, metrics, f"{Path(args.checkpoint).name} on {labels}", task.format_metrics(metrics))
    figures = task.results_figures(loaded.model, dataset, cfg, loaded.device, out / "figures")
    print(f"results figures (input, ground truth, points, prediction): {out / 'figures'}/ ({len(figures)})")
    print(dataset.summary())
    return 0


def _eval_missed_prompts(args: argparse.Namespace, loaded: LoadedModel, dataset: CocoInstanceDataset,
                         eval_cfg: EvalConfig, label_to_category: list[int], ann: str) -> int:
    """AP before and after prompting the missed instances' ground-truth boxes; writes missed_prompts.json/.md."""
    report = evaluate_with_missed_prompts(loaded.model, dataset, eval_cfg, loaded.device,
                                          iou=args.missed_iou, progress=not args.quiet,
                                          label_to_category=label_to_category)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    table = format_prompted_table(report)
    write_metrics(report, out / "missed_prompts.json")
    title = f"{Path(args.checkpoint).name} on {ann}: missed instances prompted"
    atomic_write(out / "missed_prompts.md", lambda handle: handle.write(f"# {title}\n\n{table}\n"))
    print(table)
    print(f"\nwrote {out / 'missed_prompts.json'}, {out / 'missed_prompts.md'}")
    print(dataset.summary())
    return 0


def _score_predictions(args: argparse.Namespace) -> int:
    """Score a COCO results file (from ``data merge``, ``predict`` or any tool) against ``--data``."""
    if not args.data:
        raise ValueError("--predictions needs the ground truth: --data GT.json")
    results = read_coco_results(args.predictions)
    with_masks = sum("segmentation" in r for r in results)
    if 0 < with_masks < len(results):
        raise ValueError(f"{args.predictions}: {with_masks} of {len(results)} results have a 'segmentation'; "
                         "either all or none must")
    iou_types = ("bbox", "segm") if with_masks or not results else ("bbox",)
    eval_cfg = _eval_settings(EvalConfig(), args)
    try:
        metrics = evaluate_coco(args.data, results, iou_types=iou_types, preset=eval_cfg.preset,
                                max_dets=tuple(eval_cfg.max_dets) if eval_cfg.max_dets else None)
    except ValueError as err:
        raise ValueError(f"{args.predictions} against {args.data}: {err}") from None
    out = Path(args.out) if args.out else Path(args.predictions).parent / "eval"
    _write_outputs(out, metrics, f"{Path(args.predictions).name} on {args.data}", format_metrics_table(metrics))
    if iou_types == ("bbox",):
        print("the results have no masks: bbox only")
    return 0


def _eval_settings(base: EvalConfig, args: argparse.Namespace) -> EvalConfig:
    """The eval config with the command line's ``--preset`` and ``--max-dets`` applied."""
    if args.preset:
        base = replace(base, preset=args.preset)
    if args.max_dets:
        base = replace(base, max_dets=list(args.max_dets))
    return base


def _write_outputs(out: Path, metrics: dict[str, Any], title: str, table: str,
                   results: list[dict[str, Any]] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(metrics, out / "metrics.json")
    written = [out / "metrics.json", out / "metrics.md"]
    if results is not None:
        write_coco_results(results, out / "results.json")
        written.append(out / "results.json")
    atomic_write(out / "metrics.md", lambda handle: handle.write(f"# {title}\n\n{table}\n"))
    print(table)
    print(f"\nwrote {', '.join(str(p) for p in written)}")
