"""``rsiseg eval``: COCO metrics of a checkpoint on a dataset."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from rsiseg.data.coco import CocoInstanceDataset
from rsiseg.engine.checkpoint import load_checkpoint
from rsiseg.evaluation.coco import format_metrics_table, write_metrics
from rsiseg.inference.export import write_coco_results
from rsiseg.inference.predictor import evaluate_model, model_from_state, stored_config


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate ``args.checkpoint`` and write ``metrics.json``, ``results.json`` and ``metrics.md``."""
    state = load_checkpoint(args.checkpoint)
    cfg = stored_config(state, args.checkpoint)
    ann = args.data or cfg.data.val_ann
    if not ann:
        raise ValueError(f"{args.checkpoint}: its config has no data.val_ann; pass --data ANNOTATIONS.json")
    images = args.images or (cfg.data.val_images if not args.data else None) or str(Path(ann).parent)
    eval_cfg = cfg.eval
    if args.preset:
        eval_cfg = replace(eval_cfg, preset=args.preset)
    if args.max_dets:
        eval_cfg = replace(eval_cfg, max_dets=list(args.max_dets))
    top = eval_cfg.max_dets[-1] if eval_cfg.max_dets else (1000 if eval_cfg.preset == "isaid" else 100)
    # The model must be allowed to return as many detections as the metric counts.
    overrides = {"detections_per_img": min(top, 1000)} if top > cfg.model.detections_per_img else None
    loaded = model_from_state(state, args.device, overrides, source=args.checkpoint)
    dataset = CocoInstanceDataset(ann, images, in_channels=cfg.model.in_channels, repair=cfg.data.repair)
    metrics, results = evaluate_model(loaded.model, dataset, eval_cfg, loaded.device, progress=not args.quiet)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(metrics, out / "metrics.json")
    write_coco_results(results, out / "results.json")
    table = format_metrics_table(metrics)
    (out / "metrics.md").write_text(f"# {Path(args.checkpoint).name} on {ann}\n\n{table}\n")
    print(table)
    print(dataset.index.report.summary())
    print(f"\nwrote {out / 'metrics.json'}, {out / 'metrics.md'} and {out / 'results.json'}")
    return 0
