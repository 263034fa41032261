"""PointSAM's claim in miniature: point-only adaptation beats zero-shot SAM and approaches supervised tuning.

Usage: .venv/bin/python bench/bench_pointsam_modes.py --pretrained runs/pointsam_modes/pretrain/best.pth
           [--data runs/pointsam_sar/data] [--epochs 5] [--trainable decoder] [--out runs/pointsam_modes]

The tiny SAM has no released weights, so it is first pretrained on the optical synthetic scenes
(``configs/pointsam_tiny.yaml`` with every weight training; see the README). This script then takes that
checkpoint to a shifted domain, the same kind of scenes seen as speckled SAR-like intensity
(``rsiseg data synth --style sar``), and reports on its validation split, every instance prompted by its
centre point:

* ``zero-shot``: the pretrained SAM as it is;
* ``supervised``: tuned with the ground-truth masks (the upper bound);
* ``self_training``: tuned from the points alone, EMA teacher pseudo-masks on weak views;
* ``pointsam``: self-training plus negative prompt calibration and prototype regularization.

Each tuning run starts from the checkpoint, trains ``--trainable`` (the decoder by default) for
``--epochs`` with the options of ``configs/pointsam_tiny.yaml`` otherwise, and is evaluated once at
the end. Writes ``modes.json`` and ``modes.md`` into ``--out``. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from rsiseg.config import config_from_dict
from rsiseg.engine.trainer import Trainer
from rsiseg.models.registry import build_model
from rsiseg.tasks import get_task

COLUMNS = [("prompt", "mIoU"), ("prompt", "IoU@50"), ("segm", "AP"), ("segm", "AP50"), ("bbox", "AP50"),
           ("prompt", "mean_box_IoU")]


def base_config(args: argparse.Namespace) -> dict:
    raw = yaml.safe_load(Path("configs/pointsam_tiny.yaml").read_text())
    data = Path(args.data)
    raw["data"].update(train_ann=str(data / "annotations/instances_train.json"), train_images=str(data / "images"),
                       val_ann=str(data / "annotations/instances_val.json"), val_images=str(data / "images"))
    # Point prompts only: the pretraining's box share would give the supervised row prompts the others lack.
    raw["model"]["sam"].update(checkpoint=str(args.pretrained), trainable=args.trainable, box_prompts=0.0)
    raw["train"].update(epochs=args.epochs, eval_interval=0, tensorboard=False, device="cpu", lr=args.lr,
                        warmup_iters=10)
    return raw


def run_mode(raw: dict, mode: str, out: Path) -> tuple[dict, float]:
    raw = json.loads(json.dumps(raw))
    raw["model"]["sam"]["mode"] = mode
    raw["train"]["output_dir"] = str(out / mode)
    start = time.perf_counter()
    metrics = Trainer(config_from_dict(raw), overwrite=True, progress=False).fit()
    return metrics, time.perf_counter() - start


def zero_shot(raw: dict) -> dict:
    cfg = config_from_dict(json.loads(json.dumps(raw)))
    task = get_task("prompted")
    dataset = task.dataset(cfg, cfg.data.val_ann, cfg.data.val_images)
    model = build_model(cfg.model).eval()
    return task.evaluate(model, dataset, cfg, torch.device("cpu"), progress=False)


def table(rows: list[dict]) -> str:
    head = "| run | mIoU | IoU@50 | mask AP | mask AP50 | box AP50 (point-to-box) | mean box IoU | minutes |"
    lines = [head, "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = [f"{100 * row['metrics'][g][k]:.1f}" if row["metrics"][g][k] is not None else "-" for g, k in COLUMNS]
        lines.append(f"| {row['run']} | " + " | ".join(cells) + f" | {row['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", type=Path, required=True, help="the tiny SAM pretrained on optical scenes")
    parser.add_argument("--data", default="runs/pointsam_sar/data", help="the shifted domain (rsiseg data synth --style sar)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.0003)
    parser.add_argument("--trainable", default="decoder", choices=["decoder", "lora", "all"])
    parser.add_argument("--modes", nargs="+", default=["supervised", "self_training", "pointsam"])
    parser.add_argument("--out", type=Path, default=Path("runs/pointsam_modes"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    raw = base_config(args)
    start = time.perf_counter()
    rows = [{"run": "zero-shot", "metrics": zero_shot(raw), "seconds": 0.0}]
    print(f"zero-shot evaluated in {time.perf_counter() - start:.0f} s")
    for mode in args.modes:
        metrics, seconds = run_mode(raw, mode, args.out)
        rows.append({"run": mode, "metrics": metrics, "seconds": seconds})
        print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "modes.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                     "rows": rows}, indent=1, default=str))
    (args.out / "modes.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
