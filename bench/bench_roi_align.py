"""RoIAlign on the CPU: torchvision's kernels against rsiseg's sparse product (``SparseRoIAlign``).

Two measurements, both with ``--threads`` threads:

* ``op``: the box pooler (7x7) and the mask pooler (14x14) alone, forward and backward, on random FPN
  features of ``--batch`` images at ``--size`` px with ``--rois`` random boxes per image (sizes spread
  over the levels), and YOLACT's prototype crops (``roi_align``, 56x56, aligned) of 100 boxes on one
  image's 32 prototypes; best of ``--repeats``, and the largest difference of the outputs and gradients;
* ``step``: training steps (forward and backward, no optimiser step) of ``--config``'s model on its
  first training images, once with torchvision's kernels in every rsiseg RoIAlign and once with the
  sparse product, the same seed each time: the median step time, and the
  losses of the first step side by side.

Usage: .venv/bin/python bench/bench_roi_align.py [--config configs/ssdd_cpu.yaml
           model.name=cascade_maskrcnn_r18_prompt] [--steps 6] [--threads 2] [--out /tmp/bench_roi_align.json]

Never asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path
from unittest import mock

import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as torchvision_roi_align

from rsiseg.config import load_config
from rsiseg.data.coco import CocoInstanceDataset
from rsiseg.inference.predictor import without_initial_weights
from rsiseg.models.layers import roi_align as roi_align_module
from rsiseg.models.layers.rcnn_assembly import ROI_LEVELS
from rsiseg.models.layers.roi_align import SparseRoIAlign, roi_align
from rsiseg.models.registry import build_model


def random_case(args: argparse.Namespace) -> tuple[OrderedDict, list[torch.Tensor], list[tuple[int, int]]]:
    """FPN features ``[B, C, size / 2^(l+2), ...]`` and ``--rois`` boxes per image, widths from 2 to 300 px."""
    generator = torch.Generator().manual_seed(0)
    features = OrderedDict(
        (name, torch.randn(args.batch, args.channels, args.size >> (level + 2), args.size >> (level + 2),
                           generator=generator, requires_grad=True))
        for level, name in enumerate(ROI_LEVELS))
    boxes = []
    for _ in range(args.batch):
        corner = torch.rand(args.rois, 2, generator=generator) * args.size
        extent = 2 + torch.rand(args.rois, 2, generator=generator) ** 2 * 298
        boxes.append(torch.cat([corner, corner + extent], 1).clamp(max=args.size))
    return features, boxes, [(args.size, args.size)] * args.batch


def random_prototypes(args: argparse.Namespace) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """YOLACT's 32 prototypes ``[1, 32, size / 4, size / 4]`` of one image and 100 boxes of 5-65 px."""
    generator = torch.Generator().manual_seed(1)
    prototypes = torch.randn(1, 32, args.size // 4, args.size // 4, generator=generator, requires_grad=True)
    corner = torch.rand(100, 2, generator=generator) * (args.size - 65)
    return prototypes, [torch.cat([corner, corner + 5 + torch.rand(100, 2, generator=generator) * 60], 1)]


def time_call(call, inputs: tuple[torch.Tensor, ...], repeats: int) -> tuple[float, float, torch.Tensor,
                                                                             tuple[torch.Tensor, ...]]:
    """Best forward and backward seconds of ``call()``, its output and the gradients of ``inputs``
    (under a fixed upstream gradient)."""
    best_forward = best_backward = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        out = call()
        forward = time.perf_counter() - start
        upstream = torch.ones_like(out).mul_(torch.linspace(-1, 1, out.shape[1])[None, :, None, None])
        start = time.perf_counter()
        grads = torch.autograd.grad(out, inputs, upstream)
        best_forward, best_backward = min(best_forward, forward), min(best_backward, time.perf_counter() - start)
    return best_forward, best_backward, out.detach(), grads


def op_rows(args: argparse.Namespace) -> list[dict]:
    features, boxes, shapes = random_case(args)
    rows = []
    for size in (7, 14):
        timed = [time_call(partial(pooler_cls(ROI_LEVELS, size, 2), features, boxes, shapes),
                           tuple(features.values()), args.repeats)
                 for pooler_cls in (MultiScaleRoIAlign, SparseRoIAlign)]
        rows.append(op_row(f"FPN pooler {size}x{size}", args.rois * args.batch, *timed))
    prototypes, crop_boxes = random_prototypes(args)
    timed = [time_call(partial(function, prototypes, crop_boxes, 56, 0.25, 2, True), (prototypes,), args.repeats)
             for function in (torchvision_roi_align, roi_align)]
    rows.append(op_row("YOLACT prototype crops 56x56 (aligned)", len(crop_boxes[0]), *timed))
    for row in rows:
        print(row, flush=True)
    return rows


def op_row(name: str, rois: int, reference: tuple, sparse: tuple) -> dict:
    """One table row from the two :func:`time_call` results of torchvision and the sparse product."""
    return {"pooling": name, "rois": rois,
            "torchvision_forward_ms": round(reference[0] * 1e3, 1), "torchvision_backward_ms": round(reference[1] * 1e3, 1),
            "sparse_forward_ms": round(sparse[0] * 1e3, 1), "sparse_backward_ms": round(sparse[1] * 1e3, 1),
            "max_output_diff": float((reference[2] - sparse[2]).abs().max()),
            "max_grad_diff": max(float((a - b).abs().max()) for a, b in zip(reference[3], sparse[3]))}


def torchvision_kernels() -> contextlib.AbstractContextManager:
    """Within: every rsiseg RoIAlign (``SparseRoIAlign``, ``roi_align``) runs torchvision's kernels."""
    return mock.patch.object(roi_align_module, "sparse_applies", return_value=False)


def step_rows(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.overrides)
    data = CocoInstanceDataset(cfg.data.train_ann, cfg.data.train_images, in_channels=cfg.model.in_channels)
    items = [data[i] for i in range(cfg.train.batch_size)]
    images, targets = [image for image, _ in items], [target for _, target in items]
    report: dict = {"config": args.config, "overrides": args.overrides, "batch": len(items)}
    for name, kernels in (("torchvision", torchvision_kernels), ("sparse", contextlib.nullcontext)):
        torch.manual_seed(0)
        model = build_model(without_initial_weights(cfg.model)).train()
        times, first = [], None
        for step in range(args.steps + 1):  # step 0 warms up
            torch.manual_seed(step)
            start = time.perf_counter()
            with kernels():
                losses = model(images, targets)
                sum(losses.values()).backward()
            model.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - start)
            if first is None:
                first = {k: round(v.item(), 6) for k, v in losses.items()}
        report[name] = {"median_step_s": round(statistics.median(times), 3), "steps": [round(t, 3) for t in times],
                        "first_losses": first}
        print(name, report[name], flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="also time training steps of this config's model")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.name=...")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=352)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--rois", type=int, default=512, help="per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="/tmp/bench_roi_align.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "size": args.size, "op": op_rows(args)}
    if args.config:
        report["step"] = step_rows(args)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
