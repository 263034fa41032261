"""YOLACT and RELACT (ResNet-50) against Mask R-CNN R50-FPN at the same input size, in one process.

Usage: .venv/bin/python bench/bench_yolact_speed.py [--width 1000] [--height 600] [--batches 1 2]
           [--repeats 3] [--threads 2] [--out /tmp/bench_yolact.json]

Every model resizes to the paper's 600 short / 1000 long edge (``min_size`` 600, ``max_size`` 1000) and
keeps exactly 100 detections per image (``box_score_thresh`` 0, ``detections_per_img`` 100), so the
post-processing load is the same for all. Weights are random: speed does not depend on them here, the
detection count being fixed. For each model, on the default (fast: batch norms folded, channels-last)
inference path of ``rsiseg predict`` and on the ``--exact`` one:

* ``pre``: the input transform (normalise, resize, batch);
* ``model``: the network with its own box-level post-processing (YOLACT: Fast NMS and mask assembly;
  Mask R-CNN: RPN, RoI heads, NMS, mask head);
* ``post``: boxes back to the image and the COCO export (RLE masks pasted inside the boxes).

Reported: images/s of the model alone and of the whole path, the shares of pre and post, and the
ratio to Mask R-CNN. The times are the best of ``--repeats`` after a warm-up. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rsiseg.config import ModelConfig, PhaseConfig, YolactConfig
from rsiseg.inference.export import prediction_to_coco
from rsiseg.inference.fast import prepare_for_inference
from rsiseg.models.registry import build_model

COMMON = dict(num_classes=1, min_size=600, max_size=1000, box_score_thresh=0.0, detections_per_img=100,
              anchor_ratios=[[1.0, 0.5, 2.0]])
MODELS = {
    "maskrcnn_r50_fpn": ModelConfig(name="maskrcnn_r50_fpn", **COMMON),
    "yolact_r50": ModelConfig(name="yolact_r50", anchor_sizes=[[12], [24], [48], [96], [192]], box_nms_thresh=0.6,
                              **COMMON),
    "relact_r50": ModelConfig(name="yolact_r50", anchor_sizes=[[12], [24], [48], [96], [192]], box_nms_thresh=0.6,
                              yolact=YolactConfig(sorting="quality", phase=PhaseConfig(enabled=True)), **COMMON),
}


def timed(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of ``fn()`` over ``repeats`` runs after one warm-up, and its last result."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure(model: torch.nn.Module, images: list[torch.Tensor], repeats: int) -> dict[str, float]:
    with torch.inference_mode():
        pre, _ = timed(lambda: model.transform(images), repeats)
        forward, preds = timed(lambda: model(images), repeats)  # includes the transform and the box rescale
        post, _ = timed(lambda: [prediction_to_coco(p, i, [1]) for i, p in enumerate(preds)], repeats)
    network = forward - pre
    total = forward + post
    count = len(images)
    return {"model_img_s": round(count / network, 3), "total_img_s": round(count / total, 3),
            "pre_share": round(pre / total, 3), "post_share": round(post / total, 3),
            "detections": [len(p["scores"]) for p in preds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="/tmp/bench_yolact.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, args.height, args.width, generator=generator) for _ in range(max(args.batches))]
    report: dict = {"size": [args.width, args.height], "threads": args.threads, "rows": []}
    for name, cfg in MODELS.items():
        for path in ("fast", "exact"):
            torch.manual_seed(0)
            model = build_model(cfg).eval()
            params = sum(p.numel() for p in model.parameters())
            if path == "fast":
                prepare_for_inference(model, channels_last=True)
            for batch in args.batches:
                row = {"model": name, "path": path, "batch": batch, "params_m": round(params / 1e6, 2),
                       **measure(model, images[:batch], args.repeats)}
                report["rows"].append(row)
                print(row, flush=True)
    for row in report["rows"]:
        reference = next(r for r in report["rows"] if r["model"] == "maskrcnn_r50_fpn" and r["path"] == row["path"]
                         and r["batch"] == row["batch"])
        row["model_vs_maskrcnn"] = round(row["model_img_s"] / reference["model_img_s"], 2)
        row["total_vs_maskrcnn"] = round(row["total_img_s"] / reference["total_img_s"], 2)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["rows"], indent=1))


if __name__ == "__main__":
    main()
