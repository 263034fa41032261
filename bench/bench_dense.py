"""Time and memory of dense scenes (hundreds to thousands of instances per image), one fresh process per case.

Usage: .venv/bin/python bench/bench_dense.py [--label before] [--out /tmp/bench_dense.json]
           [--counts 2000 5000] [--cases load train_step train_step_r50 predict eval_data]
           [--predict-batches 8] [--data-dir /tmp/rsiseg_bench_dense] [--timeout 600] [--mem-gb 20] [--min-free-gb 0]
To measure another checkout: PYTHONPATH=/path/to/checkout/src .venv/bin/python bench/bench_dense.py ...

Cases (synthetic 800 px RGB PNGs, ~10 px polygon instances of 3 categories, written once and cached):
  load            ds[0] with the hflip/vflip/rot90 training transforms, N instances: first and median call
  train_step      tiny Mask R-CNN (r18, 64-ch FPN, 800 px): one forward+backward on one N-instance image
  train_step_r50  the same with maskrcnn_r50_fpn, 256-ch FPN, default RoI/RPN sampling (N=2000 only)
  predict         eval forward of a batch of random images at ~1000 detections each, then prediction_to_coco
  eval_data       evaluate_model with an empty-prediction stub on 5 images x 400 instances: data path only
Peak RSS is ru_maxrss of the child; "increment" is the peak of the measured step above the RSS before it.
Children run under an address-space cap (--mem-gb); a child that fails or is killed is recorded as
"failed: <reason>"; on a shared machine --min-free-gb holds each case until that much memory is free.
Prints a Markdown table and writes all figures to --out. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 800
GB = 1024**2  # ru_maxrss and VmRSS are in KB


def write_dataset(root: Path, images: int, objects: int, seed: int = 0) -> Path:
    """COCO JSON + PNGs of square-ish ~10 px quadrilaterals at random places (overlaps allowed)."""
    folder = root / f"dense_{images}x{objects}"
    ann_file = folder / "instances.json"
    if ann_file.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coco = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    for image_id in range(1, images + 1):
        name = f"img{image_id}.png"
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / name)
        coco["images"].append({"id": image_id, "file_name": name, "height": SIZE, "width": SIZE})
        for _ in range(objects):
            w, h = rng.integers(8, 13, 2)
            x, y = rng.integers(1, SIZE - 14, 2)
            jitter = rng.uniform(-1, 1, 8)
            poly = np.array([x, y, x + w, y, x + w, y + h, x, y + h], float) + jitter
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 4)),
                "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0,
                "segmentation": [[round(float(v), 2) for v in poly]],
            })
    ann_file.write_text(json.dumps(coco))
    return folder


# ---------------------------------------------------------------- child side: one case in this process


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak() -> None:
    """Restart the peak-RSS count at the current RSS (Linux; this also lowers ru_maxrss)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def tiny_model_cfg(**overrides):
    from rsiseg.config import ModelConfig

    base = dict(name="maskrcnn_r18_fpn", num_classes=3, fpn_channels=64, min_size=SIZE, max_size=SIZE,
                roi_batch_size_per_image=64, rpn_batch_size_per_image=64,
                rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
                rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
                anchor_sizes=[[8], [16], [32], [64], [128]])
    return ModelConfig(**{**base, **overrides})


def dataset(folder: Path, train: bool):
    from rsiseg.config import DataConfig
    from rsiseg.data.coco import CocoInstanceDataset
    from rsiseg.data.transforms import build_train_transforms

    transforms = build_train_transforms(DataConfig(hflip=0.5, vflip=0.5, rot90=0.5), 3) if train else None
    return CocoInstanceDataset(folder / "instances.json", folder, in_channels=3, transforms=transforms)


# Each case fills ``out`` as it goes, so a case that runs out of memory still reports how far it got.


def case_load(out: dict, folder: Path, repeats: int) -> None:
    ds = dataset(folder, train=True)
    out["rss_before_kb"] = rss_kb()
    times = out.setdefault("times_s", [])
    for _ in range(repeats):
        start = time.perf_counter()
        _, target = ds[0]
        times.append(time.perf_counter() - start)
        out["instances"] = int(len(target["labels"]))
        del target
    out.update(first_s=times[0], median_s=statistics.median(times))


def case_train_step(out: dict, folder: Path, model_cfg) -> None:
    from rsiseg.data.coco import collate
    from rsiseg.models.registry import build_model

    start = time.perf_counter()
    images, targets = collate([dataset(folder, train=True)[0]])
    out.update(load_s=time.perf_counter() - start, instances=int(len(targets[0]["labels"])))
    model = build_model(model_cfg).train()
    out.update(load_peak_kb=peak_kb(), rss_before_kb=rss_kb())
    reset_peak()
    start = time.perf_counter()
    losses = model(images, targets)
    sum(losses.values()).backward()
    out.update(step_s=time.perf_counter() - start, loss=float(sum(v.item() for v in losses.values())))


def case_predict(out: dict, batch: int) -> None:
    import torch

    from rsiseg.inference.export import prediction_to_coco
    from rsiseg.models.registry import build_model

    cfg = tiny_model_cfg(box_score_thresh=0.0, box_nms_thresh=0.99, detections_per_img=1000,
                         rpn_pre_nms_top_n_test=4000, rpn_post_nms_top_n_test=2000)
    model = build_model(cfg).eval()
    images = [torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in range(batch)]
    out["rss_before_kb"] = rss_kb()
    reset_peak()
    start = time.perf_counter()
    with torch.no_grad():
        preds = model(images)
    out.update(forward_s=time.perf_counter() - start, detections_per_image=[int(len(p["boxes"])) for p in preds])
    start = time.perf_counter()
    results = [prediction_to_coco(p, i + 1, [1, 2, 3]) for i, p in enumerate(preds)]
    out.update(export_s=time.perf_counter() - start, results=sum(len(r) for r in results))


def case_eval_data(out: dict, folder: Path) -> None:
    import torch
    from torch import nn

    from rsiseg.config import EvalConfig
    from rsiseg.inference.predictor import evaluate_model

    class EmptyModel(nn.Module):
        def forward(self, images, targets=None):
            return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                     "scores": torch.zeros(0)} for _ in images]

    ds = dataset(folder, train=False)
    out["images"] = len(ds)
    start = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    out["item_s_per_image"] = (time.perf_counter() - start) / len(ds)
    out["rss_before_kb"] = rss_kb()
    reset_peak()
    start = time.perf_counter()
    evaluate_model(EmptyModel(), ds, EvalConfig(), torch.device("cpu"), num_workers=0, progress=False)
    out["eval_s_per_image"] = (time.perf_counter() - start) / len(ds)


def run_case(args: argparse.Namespace) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (int(args.mem_gb * 1024**3),) * 2)
    out: dict = {"case": args.case, "n": args.n}
    try:
        import torch

        import rsiseg

        torch.set_num_threads(2)
        out["rsiseg_file"] = rsiseg.__file__
        print(f"[{args.case} n={args.n}] rsiseg from {rsiseg.__file__}", flush=True)
        folder = Path(args.data)
        if args.case == "load":
            case_load(out, folder, args.repeats)
        elif args.case in ("train_step", "train_step_r50"):
            r50 = dict(name="maskrcnn_r50_fpn", fpn_channels=256, roi_batch_size_per_image=512,
                       rpn_batch_size_per_image=256, rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=2000,
                       rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000)
            case_train_step(out, folder, tiny_model_cfg(**(r50 if args.case.endswith("r50") else {})))
        elif args.case == "predict":
            case_predict(out, args.n)
        elif args.case == "eval_data":
            case_eval_data(out, folder)
        out["status"] = "ok"
    except BaseException as err:  # MemoryError, allocator RuntimeError, ...: a result, not a crash
        text = str(err)
        asked = re.search(r"tried to allocate \d+ bytes", text)
        reason = f"out of memory ({asked.group(0)})" if asked else (text.splitlines() or [""])[0][:160]
        out["status"] = f"failed: {type(err).__name__}: {reason}"
    if "rss_before_kb" in out:
        out["step_peak_kb"] = peak_kb()  # since reset_peak (load case: since start)
    out["peak_rss_kb"] = max(peak_kb(), out.get("load_peak_kb", 0))
    Path(args.json_out).write_text(json.dumps(out, indent=1))
    print(f"[{args.case} n={args.n}] {out['status']}", flush=True)


# ---------------------------------------------------------------- parent side: one subprocess per case


def wait_for_memory(gb: float, limit_s: int = 1800) -> float:
    """Sleep until MemAvailable >= gb (a shared machine's other jobs); seconds waited."""
    start = time.perf_counter()
    while gb > 0 and time.perf_counter() - start < limit_s:
        meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
        if int(meminfo["MemAvailable"].split()[0]) >= gb * GB:
            break
        time.sleep(10)
    return time.perf_counter() - start


def launch(args: argparse.Namespace, case: str, n: int, data: Path) -> dict:
    waited = wait_for_memory(args.min_free_gb)
    json_out = data / f"result_{args.label}_{case}_{n}.json"
    json_out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--case", case, "--n", str(n), "--data", str(data), "--json-out", str(json_out),
           "--mem-gb", str(args.mem_gb), "--repeats", str(args.repeats)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=args.timeout, stderr=subprocess.PIPE, text=True)
        reason = f"exit code {proc.returncode}" + (" (SIGKILL: kernel OOM killer?)" if proc.returncode in (-9, 137) else "")
        tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
    except subprocess.TimeoutExpired:
        reason, tail = f"timeout after {args.timeout} s", []
    wall = time.perf_counter() - start
    if json_out.is_file():
        result = json.loads(json_out.read_text())
    else:
        result = {"case": case, "n": n, "status": f"failed: {reason}" + (f" ({tail[0][:160]})" if tail else "")}
    result["wall_s"], result["waited_for_memory_s"] = wall, waited
    return result


def row(r: dict) -> str:
    def gb(key: str) -> str:
        return f"{r[key] / GB:.2f}" if key in r else "-"

    keys = [("first_s", "first"), ("median_s", "median"), ("load_s", "load"), ("step_s", "step"),
            ("forward_s", "forward"), ("export_s", "export"), ("item_s_per_image", "item/img"),
            ("eval_s_per_image", "evaluate/img")]
    times = ", ".join(f"{name} {r[k]:.2f} s" for k, name in keys if k in r)
    if "first_s" not in r and r.get("times_s"):
        times = ", ".join(["calls"] + [f"{t:.2f} s" for t in r["times_s"]])
    times = times or "-"
    if "detections_per_image" in r:
        times += f"; {min(r['detections_per_image'])}-{max(r['detections_per_image'])} dets/img"
    inc = f"{(r['step_peak_kb'] - r['rss_before_kb']) / GB:.2f}" if "step_peak_kb" in r else "-"
    status = f"{r['status']} ({r['wall_s']:.0f} s wall)"
    return f"| {r['case']} | {r['n']} | {times} | {gb('peak_rss_kb')} | {gb('rss_before_kb')} | {inc} | {status} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="run")
    parser.add_argument("--out", default=None, help="JSON file of all results (default /tmp/bench_dense_<label>.json)")
    parser.add_argument("--counts", type=int, nargs="+", default=[2000], help="instances per image for load/train_step")
    parser.add_argument("--cases", nargs="+", default=["load", "train_step", "train_step_r50", "predict", "eval_data"])
    parser.add_argument("--predict-batches", type=int, nargs="+", default=[8])
    parser.add_argument("--data-dir", default="/tmp/rsiseg_bench_dense", help="cached synthetic datasets")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per case")
    parser.add_argument("--mem-gb", type=float, default=20.0, help="address-space cap of each child")
    parser.add_argument("--min-free-gb", type=float, default=0.0, help="wait for this much free memory before each case")
    parser.add_argument("--repeats", type=int, default=3, help="ds[0] calls of the load case")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        run_case(args)
        return

    root = Path(args.data_dir)
    plan = []  # (case, n, data folder)
    for case in args.cases:
        if case in ("load", "train_step"):
            plan += [(case, n, write_dataset(root, 1, n)) for n in args.counts]
        elif case == "train_step_r50":
            plan.append((case, 2000, write_dataset(root, 1, 2000)))
        elif case == "predict":
            plan += [(case, b, root) for b in args.predict_batches]
        elif case == "eval_data":
            plan.append((case, 400, write_dataset(root, 5, 400)))
    results = []
    for case, n, folder in plan:
        results.append(launch(args, case, n, folder))
        print(row(results[-1]), flush=True)
    files = {r.get("rsiseg_file") for r in results} - {None}
    print(f"\n## {args.label}: rsiseg from {', '.join(sorted(files))}\n")
    print("N = instances per image (predict: batch size). peak = ru_maxrss of the child process; "
          "before = VmRSS before the timed step; increment = peak of the step - before.\n")
    print("| case | N | times | peak RSS GB | before GB | increment GB | status |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(row(r))
    out = Path(args.out or f"/tmp/bench_dense_{args.label}.json")
    out.write_text(json.dumps({"label": args.label, "results": results}, indent=1))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
