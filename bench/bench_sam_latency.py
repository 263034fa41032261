"""PointSAM's interactive cost: the image encoding once, then the latency of each prompt from the cache.

Usage: .venv/bin/python bench/bench_sam_latency.py [--variants tiny vit_b] [--size 1024] [--prompts 1 16]
           [--repeats 3] [--threads 2] [--device cpu] [--out /tmp/bench_sam.json]

For each SAM variant (random weights: the cost does not depend on them), an image of ``--size`` pixels
square is encoded once (:meth:`PointSam.encode`), then ``--prompts`` point prompts are answered from the
embedding (:meth:`PointSam.answer`: prompt encoder, mask decoder, the upsampling to the image and the
predicted-IoU pick). Reported: the encoding time, the time per prompt for each prompt count, and the
parameter counts. Best of ``--repeats`` after a warm-up. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rsiseg.config import ModelConfig, SamConfig
from rsiseg.models.registry import build_model


def best_time(fn, repeats: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["tiny", "vit_b"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for variant in args.variants:
        model = build_model(ModelConfig(name=f"pointsam_{variant}", sam=SamConfig(mode="supervised")))
        model = model.to(device).eval()
        image = torch.rand(3, args.size, args.size, device=device)
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            encode = best_time(lambda: model.encode([image]), args.repeats, sync)
            encoded = model.encode([image])
            row = {"variant": variant, "size": args.size, "input": model.image_size,
                   "params_M": round(sum(p.numel() for p in model.sam.parameters()) / 1e6, 2),
                   "encoder_params_M": round(sum(p.numel() for p in model.sam.image_encoder.parameters()) / 1e6, 2),
                   "encode_s": round(encode, 4)}
            for count in args.prompts:
                points = (torch.rand(count, 2, generator=generator) * args.size).to(device)
                seconds = best_time(lambda: model.answer(encoded, 0, points=points), args.repeats, sync)
                row[f"ms_per_prompt@{count}"] = round(1000 * seconds / count, 2)
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps({"device": str(device), "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
