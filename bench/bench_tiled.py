"""Whole-scene prediction: throughput and peak memory against scene size, tiled path vs a naive loop.

Usage: .venv/bin/python bench/bench_tiled.py --checkpoint runs/demo/train/last.pth
           [--sizes 4096 8192 16384] [--modes tiled naive] [--naive-max 8192] [--tile 256 --overlap 64]
           [--batch 4] [--data-dir /tmp/rsiseg_bench_tiled] [--out /tmp/bench_tiled.json] [--timeout 3000]
           [--device cuda]  (adds peak_gpu_mb: torch.cuda.max_memory_allocated)

Scenes are square uint8 RGB GeoTIFFs (EPSG:32633, 0.5 m pixels, 256 px internal tiles), painted
with the synthetic aerial generator (a pool of 64 cells of 256 px placed by a seeded draw, about
25 objects per cell), written window by window and cached in --data-dir.

Each (size, mode) runs in a fresh process; peak RSS is that process's ru_maxrss (torch, the model
and the imports included; ``rss_before_mb`` is the imports alone).

* ``tiled``: ``rsiseg predict --tiled`` run in the process with every output (windowed reads, --batch
  tiles per forward, masks cropped to their boxes, the shared cross-tile merge run band by band, the
  instances streamed out to predictions.json, the GeoJSON and the overview as they become final).
* ``naive``: the loop people write first: the whole scene read into memory, one tile per forward,
  every detection painted into a full-scene instance-id raster (int32) and a score raster, later
  tiles overwriting earlier ones where they overlap. Its memory grows with the scene area.

Prints a Markdown table and writes all figures to --out. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

CELL = 256


def write_scene(path: Path, size: int, seed: int = 0) -> None:
    """A ``size`` px square synthetic aerial GeoTIFF, written cell by cell (never whole in memory)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from rsiseg.data.synthetic import generate_scene

    rng = np.random.default_rng(seed)
    pool = [generate_scene(rng, CELL, empty_prob=0.0)[0] for _ in range(64)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.tif")
    with rasterio.open(tmp, "w", driver="GTiff", height=size, width=size, count=3, dtype="uint8", tiled=True,
                       blockxsize=256, blockysize=256, crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 0.5, 0.5)) as ds:
        for y in range(0, size, CELL):
            for x in range(0, size, CELL):
                ds.write(np.moveaxis(pool[int(rng.integers(len(pool)))], -1, 0), window=Window(x, y, CELL, CELL))
    tmp.rename(path)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tiled(args: argparse.Namespace, scene_path: Path) -> dict:
    """``rsiseg predict --tiled`` on the scene, in this process, with every output a user gets."""
    import tempfile

    from rsiseg.cli import main as cli_main

    with tempfile.TemporaryDirectory(prefix="bench_tiled_") as out:
        code = cli_main(["-q", "predict", "--checkpoint", args.checkpoint, str(scene_path), "--tiled", "--out", out,
                         "--tile-size", str(args.tile), "--tile-overlap", str(args.overlap),
                         "--tile-batch", str(args.batch), "--score-threshold", str(args.score_threshold),
                         "--max-detections", "300", "--device", args.device])
        if code != 0:
            raise RuntimeError(f"rsiseg predict --tiled exited with {code}")
        entry = json.loads((Path(out) / "images.json").read_text())["images"][0]
        sizes = {p.name: p.stat().st_size for p in Path(out).rglob("*") if p.is_file()}
    return {"tiles": entry["tiles"], "instances": entry["instances"], "features": entry["features"],
            "output_mb": round(sum(sizes.values()) / 2**20, 1)}


def run_naive(args: argparse.Namespace, scene_path: Path) -> dict:
    import rasterio
    import torch

    from rsiseg.checkpoint import load_checkpoint
    from rsiseg.commands.predict_tiled import tiled_overrides
    from rsiseg.data.tiling import patch_windows
    from rsiseg.inference.fast import FastOptions
    from rsiseg.inference.paste import iter_windows
    from rsiseg.inference.predictor import model_from_state, predict_images

    state = load_checkpoint(args.checkpoint)
    options = SimpleNamespace(max_detections=300, score_threshold=args.score_threshold, checkpoint=args.checkpoint)
    loaded = model_from_state(state, args.device, tiled_overrides(options, state),  # the model options of predict --tiled
                              fast=FastOptions())  # folded and channels-last, as predict
    with rasterio.open(scene_path) as ds:
        image = ds.read()  # [3, H, W] uint8: the whole scene
    _, height, width = image.shape
    ids = np.zeros((height, width), dtype=np.int32)
    scores = np.zeros((height, width), dtype=np.float32)
    windows = patch_windows(height, width, args.tile, args.overlap)
    next_id = 1
    for y1, y2, x1, x2 in windows:
        tile = torch.from_numpy(image[:, y1:y2, x1:x2].astype(np.float32) / 255.0)
        with torch.inference_mode():
            pred = predict_images(loaded.model, [tile], loaded.device)[0]
        keep = pred["scores"] >= args.score_threshold
        for (local, x0, y0), score in zip(iter_windows(pred["roi_masks"][keep], pred["boxes"][keep], (y2 - y1, x2 - x1)),
                                          pred["scores"][keep].tolist()):
            mask = (local > 0.5).numpy()
            region = (slice(y1 + y0, y1 + y0 + mask.shape[0]), slice(x1 + x0, x1 + x0 + mask.shape[1]))
            better = mask & (scores[region] < score)
            ids[region][better] = next_id
            scores[region][better] = score
            next_id += 1
    return {"tiles": len(windows), "instances": int(len(np.unique(ids)) - 1)}


def worker(args: argparse.Namespace) -> None:
    import torch

    import rsiseg.cli  # noqa: F401  (the imports' memory counts in rss_before, the model's does not)

    torch.set_num_threads(args.threads)
    before = peak_mb()
    start = time.perf_counter()
    out = (run_tiled if args.worker == "tiled" else run_naive)(args, Path(args.scene))
    seconds = time.perf_counter() - start
    size = int(Path(args.scene).stem.split("_")[-1])
    out.update(seconds=round(seconds, 2), tiles_per_s=round(out["tiles"] / seconds, 3),
               megapixels_per_s=round(size * size / 1e6 / seconds, 3), peak_rss_mb=round(peak_mb()),
               rss_before_mb=round(before))
    if args.device.startswith("cuda"):
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--modes", nargs="+", default=["tiled", "naive"], choices=["tiled", "naive"])
    parser.add_argument("--naive-max", type=int, default=8192, help="largest scene the naive loop is run on")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--data-dir", default="/tmp/rsiseg_bench_tiled")
    parser.add_argument("--out", default="/tmp/bench_tiled.json")
    parser.add_argument("--timeout", type=int, default=3000)
    parser.add_argument("--worker", choices=["tiled", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--scene", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for size in args.sizes:
        scene = Path(args.data_dir) / f"scene_{size}.tif"
        if not scene.exists():
            write_scene(scene, size)
        for mode in args.modes:
            if mode == "naive" and size > args.naive_max:
                continue
            cmd = [sys.executable, __file__, "--worker", mode, "--scene", str(scene), "--checkpoint", args.checkpoint,
                   "--tile", str(args.tile), "--overlap", str(args.overlap), "--batch", str(args.batch),
                   "--score-threshold", str(args.score_threshold), "--threads", str(args.threads),
                   "--device", args.device]
            try:
                proc = subprocess.run(cmd, timeout=args.timeout, capture_output=True, text=True)
                row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
                    "failed": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
            except subprocess.TimeoutExpired:
                row = {"failed": f"timeout {args.timeout} s"}
            rows.append({"size": size, "mode": mode, **row})
            print(rows[-1], flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| scene | mode | tiles | s | tiles/s | MP/s | instances | outputs MB | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['size']} | {r['mode']} | failed: {r['failed']} |||||||")
        else:
            print(f"| {r['size']} | {r['mode']} | {r['tiles']} | {r['seconds']} | {r['tiles_per_s']} | "
                  f"{r['megapixels_per_s']} | {r['instances']} | {r.get('output_mb', '')} | {r['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
