"""Point-supervised semantic segmentation on synthetic scenes: the class-weights pair and the point-budget sweep.

Usage: .venv/bin/python bench/bench_point_ce.py [--images 96] [--size 128] [--epochs 12]
           [--counts 25 100 400 1600] [--data-dir /tmp/rsiseg_bench_point_ce] [--out /tmp/bench_point_ce.json]
           [--set model.seg.skip_connections=true ...]

Writes a synthetic six-class set (``rsiseg data synth --task semantic``), its class weights, then trains
``configs/point_ce_tiny.yaml`` (ResNet-18, plain transposed-conv decoder, focal partial CE) at the
given size and epochs:
  pair   with and without inverse-frequency class weights, at the config's 5% of pixels labelled
  sweep  with class weights, at each point count per image (--counts)
Each run is trained from scratch with the same seed and evaluated on the dense validation labels.
Prints a Markdown table and writes every figure (and the wall time of each run) to --out. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from rsiseg.config import load_config
from rsiseg.data.class_weights import compute_class_weights, write_class_weights
from rsiseg.data.synthetic_semantic import write_synthetic_semantic_dataset
from rsiseg.engine.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "point_ce_tiny.yaml"


def prepare(data_dir: Path, images: int, size: int) -> Path:
    """The synthetic set and its class weights, written once per (images, size)."""
    folder = data_dir / f"synth_{images}x{size}"
    if not (folder / "class_weights.json").is_file():
        write_synthetic_semantic_dataset(folder, images=images, size=size, seed=0, val_fraction=0.25)
        weights = compute_class_weights(folder / "labels" / "train", "index", 6)
        write_class_weights(folder / "class_weights.json", weights)
    return folder


def train(folder: Path, run: Path, epochs: int, overrides: list[str], common: list[str]) -> dict:
    """Train one run from scratch; returns its final metrics and wall time."""
    cfg = load_config(CONFIG, [
        f"data.train_images={folder}/images/train", f"data.train_labels={folder}/labels/train",
        f"data.val_images={folder}/images/val", f"data.val_labels={folder}/labels/val",
        f"model.seg.class_weights={folder}/class_weights.json", f"train.output_dir={run}",
        f"train.epochs={epochs}", f"train.step_epochs=[{max(1, epochs * 2 // 3)}]", "train.eval_interval=0",
        "train.tensorboard=false", *common, *overrides])
    started = time.perf_counter()
    metrics = Trainer(cfg, overwrite=True, progress=False).fit()["semantic"]
    return {"accuracy": metrics["accuracy"], "mIoU": metrics["mIoU"], "mean_accuracy": metrics["mean_accuracy"],
            "per_class_IoU": metrics["per_class_IoU"], "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--counts", type=int, nargs="+", default=[25, 100, 400, 1600])
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/rsiseg_bench_point_ce"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_point_ce.json"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    folder = prepare(args.data_dir, args.images, args.size)
    runs = args.data_dir / ("runs_" + "_".join(args.set) if args.set else "runs")
    rows = [("pair", "class weights", train(folder, runs / "weights", args.epochs, [], args.set)),
            ("pair", "no weights", train(folder, runs / "noweights", args.epochs, ["model.seg.class_weights=null"],
                                         args.set))]
    pixels = args.size * args.size
    for count in args.counts:
        row = train(folder, runs / f"count{count}", args.epochs, [f"data.points.count={count}"], args.set)
        rows.append(("sweep", f"{count} points ({100 * count / pixels:.2f}%)", row))
    args.out.write_text(json.dumps({"images": args.images, "size": args.size, "epochs": args.epochs, "set": args.set,
                                    "runs": [{"part": p, "setting": s, **r} for p, s, r in rows]}, indent=1))
    print("| part | setting | accuracy | mIoU | mean class accuracy | train + eval s |")
    print("|---|---|---|---|---|---|")
    for part, setting, r in rows:
        print(f"| {part} | {setting} | {100 * r['accuracy']:.1f} | {100 * r['mIoU']:.1f} | "
              f"{100 * r['mean_accuracy']:.1f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
