"""rsiseg's inference path against stock torchvision Mask R-CNN with the same weights, in one process.

Usage: .venv/bin/python bench/bench_fast_inference.py --checkpoint runs/demo/train/last.pth [--label tiny]
           [--images runs/demo/data/images] [--size 800] [--batches 1 8] [--repeats 3]
           [--ap-data runs/demo/data/annotations/instances_val.json] [--threads 2] [--out /tmp/bench_fast.json]
           [--device cuda] [--precisions bf16 fp16] [--compile]

Variants, all from the checkpoint's weights:

* ``stock``: ``torchvision.models.detection.MaskRCNN`` built with the checkpoint's anchors, limits,
  normalisation and heads (strict state-dict load), which pastes full-size masks;
* ``rsiseg``: the model as ``--exact`` runs it (masks kept in their boxes);
* ``fast``: batch norms folded into the convolutions (the default of ``predict`` and ``eval``);
* ``fast_cl``: ``fast`` plus channels-last weights (the batched input follows them): the default;
* ``fast_cl_<precision>`` for each of ``--precisions``: ``fast_cl`` under autocast (``--precision``);
* ``fast_cl_compile`` with ``--compile``: ``fast_cl`` with its backbone through ``torch.compile``
  (the warm-up batch pays the compile).

Each forward runs under ``torch.inference_mode``, and its time includes turning the outputs into
COCO results (RLE), which is where full-size masks cost. Images are the ``--images`` files resized
to ``--size`` px square. Reported: images/s at each batch size (best of ``--repeats``), the largest
difference from ``stock`` in boxes and scores (the detection counts are checked, and each detection
is compared with the same-class ``stock`` detection it pairs with, so near ties that swap order do not
read as moved boxes), and COCO AP on ``--ap-data`` for each variant. Never asserts.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torchvision.models.detection import MaskRCNN

from rsiseg.checkpoint import load_checkpoint
from rsiseg.config import EvalConfig
from rsiseg.data.coco import CocoInstanceDataset
from rsiseg.inference.export import prediction_to_coco
from rsiseg.inference.fast import FastOptions, prepare_for_inference
from rsiseg.inference.predictor import evaluate_model, model_from_state
from rsiseg.models.layers.rcnn_assembly import build_anchor_generator, default_roi_head_parts


def stock_model(loaded) -> MaskRCNN:
    """torchvision's MaskRCNN with the rsiseg model's configuration and weights."""
    cfg, model = loaded.config.model, loaded.model
    parts = default_roi_head_parts(model.backbone.out_channels, cfg.num_classes)
    stock = MaskRCNN(
        copy.deepcopy(model.backbone), num_classes=None, min_size=cfg.min_size, max_size=cfg.max_size,
        image_mean=cfg.image_mean, image_std=cfg.image_std, rpn_anchor_generator=build_anchor_generator(cfg),
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_nms_thresh=cfg.rpn_nms_thresh, box_score_thresh=cfg.box_score_thresh, box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.detections_per_img, box_head=parts.box_head, box_predictor=parts.box_predictor,
        mask_head=parts.mask_head, mask_predictor=parts.mask_predictor)
    stock.load_state_dict(model.state_dict(), strict=True)
    return stock.to(next(model.parameters()).device).eval()


def build_variants(state: dict, overrides: dict | None, args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """The variants of the module docstring, on ``args.device``."""
    def model(fast: FastOptions | None = None) -> torch.nn.Module:
        return model_from_state(state, args.device, overrides, fast=fast).model

    fold_only = model()
    prepare_for_inference(fold_only, channels_last=False)
    variants = {"stock": stock_model(model_from_state(state, args.device, overrides)), "rsiseg": model(),
                "fast": fold_only, "fast_cl": model(FastOptions())}
    for precision in args.precisions:
        variants[f"fast_cl_{precision}"] = model(FastOptions(precision=precision))
    if args.compile:
        variants["fast_cl_compile"] = model(FastOptions(compile=True))
    return variants


def load_images(folder: Path, size: int, count: int) -> list[torch.Tensor]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".tif"})[:count]
    images = []
    for path in files:
        array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        images.append(F.interpolate(tensor[None], size=(size, size), mode="bilinear", align_corners=False)[0])
    return images


def run(model, images: list[torch.Tensor]) -> tuple[list[list[dict]], list[dict]]:
    """Forward + COCO export of one batch: the COCO results and the raw predictions (moved to the CPU,
    which waits for a GPU to finish)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        preds = [{k: v.cpu() for k, v in p.items()} for p in model([image.to(device) for image in images])]
    return [prediction_to_coco(p, i, list(range(1, 100))) for i, p in enumerate(preds)], preds


def throughput(model, images: list[torch.Tensor], batch: int, repeats: int) -> float:
    run(model, images[:batch])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(model, images[:batch])
        best = min(best, time.perf_counter() - start)
    return batch / best


def pair_detections(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(rows, cols)`` pairing detections of ``a`` and ``b`` one to one: same label, boxes
    ``[N, 4]`` as close as can be (the largest coordinate difference, by an optimal assignment), so
    that near-tied detections that swapped places are compared with each other, not by position."""
    cost = torch.cdist(a["boxes"].double(), b["boxes"].double(), p=float("inf"))
    cost[a["labels"][:, None] != b["labels"][None, :]] = 1e9
    return linear_sum_assignment(cost.numpy())


def max_difference(reference: list[dict], other: list[dict]) -> dict[str, float | bool]:
    """The largest box (px) and score differences of ``other``'s detections from the ``reference``
    detections they pair with (:func:`pair_detections`), and ``same_counts`` per image."""
    same = all(len(a["scores"]) == len(b["scores"]) for a, b in zip(reference, other))
    if not same:
        return {"same_counts": False}
    boxes, scores = 0.0, 0.0
    for a, b in zip(reference, other):
        if len(a["scores"]):
            rows, cols = pair_detections(a, b)
            boxes = max(boxes, float((a["boxes"][rows] - b["boxes"][cols]).abs().max()))
            scores = max(scores, float((a["scores"][rows] - b["scores"][cols]).abs().max()))
    return {"same_counts": True, "max_box_diff_px": round(boxes, 5), "max_score_diff": round(scores, 6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--label", default="model")
    parser.add_argument("--images", default="runs/demo/data/images")
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ap-data", help="COCO JSON to compute AP on (images beside it in ../images)")
    parser.add_argument("--ap-images", help="image folder of --ap-data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--precisions", nargs="*", default=[], choices=["bf16", "fp16"],
                        help="add a fast_cl variant under autocast in each")
    parser.add_argument("--compile", action="store_true", help="add a fast_cl variant with a compiled backbone")
    parser.add_argument("--out", default="/tmp/bench_fast.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    state = load_checkpoint(args.checkpoint)
    # At --size the model's own resize must not undo the image size; AP uses the checkpoint's sizes.
    variants = build_variants(state, {"min_size": args.size, "max_size": args.size}, args)
    ap_variants = build_variants(state, None, args) if args.ap_data else {}
    images = load_images(Path(args.images), args.size, max(args.batches))
    report: dict = {"label": args.label, "checkpoint": args.checkpoint, "size": args.size, "device": args.device,
                    "variants": {}}
    reference = run(variants["stock"], images[:1])[1]
    for name, model in variants.items():
        row = {f"img_per_s_b{b}": round(throughput(model, images, b, args.repeats), 3) for b in args.batches}
        row.update(max_difference(reference, run(model, images[:1])[1]))
        if args.ap_data:
            root = args.ap_images or str(Path(args.ap_data).parent.parent / "images")
            dataset = CocoInstanceDataset(args.ap_data, root, in_channels=3)
            metrics, _ = evaluate_model(ap_variants[name], dataset, EvalConfig(), torch.device(args.device),
                                        progress=False)
            row.update(bbox_AP=round(metrics["bbox"]["AP"] * 100, 2), segm_AP=round(metrics["segm"]["AP"] * 100, 2))
        report["variants"][name] = row
        print(name, row, flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
