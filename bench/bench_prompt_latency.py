"""Box-prompt latency after encoding: what a click costs once the image is encoded (the paper: 40 ms on a GPU).

Builds a model from its registry name at the paper's setting (800x800 input, S_ps 28, all prompt modules
on; weights are random: the cost does not depend on them), encodes one image (backbone, FPN and the
GPM's global tokens), then times ``segment_boxes`` for 1 box and for batches of boxes on that encoding.

Usage: .venv/bin/python bench/bench_prompt_latency.py [--model maskrcnn_r50_prompt] [--size 800]
       [--boxes 1 10 100] [--runs 20] [--device cpu|cuda] [--threads N]
Prints the median encode time and, per batch size, the median time per call and per box.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rsiseg.config import ModelConfig
from rsiseg.evaluation.efficiency import describe_device
from rsiseg.models.layers.box_prompting import encode_images, segment_boxes
from rsiseg.models.registry import build_model


def timed(fn, device: torch.device, runs: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` over ``runs`` calls after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def random_boxes(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, 4]`` boxes of 8-200 px inside a ``size`` square."""
    sides = torch.randint(8, 200, (count, 2), generator=generator).float()
    corners = torch.rand(count, 2, generator=generator) * (size - sides)
    return torch.cat([corners, corners + sides], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="maskrcnn_r50_prompt")
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--boxes", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = ModelConfig(name=args.model, num_classes=15, min_size=args.size, max_size=args.size)
    model = build_model(cfg).to(device).eval()
    image = torch.rand(3, args.size, args.size, device=device)
    encode_ms = timed(lambda: encode_images(model, [image]), device, max(3, args.runs // 4))
    encoded = encode_images(model, [image])
    print(f"{args.model}, {args.size}x{args.size}, {describe_device(device)}, {torch.get_num_threads()} CPU threads")
    print(f"encode (backbone + FPN + global prompt tokens): {encode_ms:.1f} ms")
    print("| boxes per call | ms per call | ms per box |")
    print("|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for count in args.boxes:
        boxes = random_boxes(count, args.size, generator).to(device)
        call_ms = timed(lambda: segment_boxes(model, encoded, [boxes]), device, args.runs)
        print(f"| {count} | {call_ms:.1f} | {call_ms / count:.2f} |")


if __name__ == "__main__":
    main()
