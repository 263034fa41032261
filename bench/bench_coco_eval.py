"""Time COCO evaluation: faster-coco-eval (rsiseg.evaluation) against pycocotools on a dense scene set.

Usage: .venv/bin/python bench/bench_coco_eval.py [--images 20] [--objects 400]
Prints seconds per iou type and the largest difference between the two tools' statistics.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rsiseg.evaluation.coco import evaluate_coco, stat_names
from rsiseg.structures import mask_to_rle


def dense_dataset(images: int, objects: int, size: int = 800, seed: int = 0) -> tuple[dict, list[dict]]:
    """Square instances of 6-40 px (iSAID-like density) and jittered, partly wrong detections."""
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    results = []
    for image_id in range(1, images + 1):
        gt["images"].append({"id": image_id, "height": size, "width": size})
        for _ in range(objects):
            w, h = rng.integers(6, 40, 2)
            x, y = rng.integers(0, size - 41, 2)
            cat = int(rng.integers(1, 4))
            poly = [float(v) for v in (x, y, x + w, y, x + w, y + h, x, y + h)]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": cat,
                                      "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h),
                                      "iscrowd": 0, "segmentation": [poly]})
            if rng.random() < 0.85:
                dx, dy = rng.normal(0, 2, 2)
                x2, y2 = int(np.clip(x + dx, 0, size - 41)), int(np.clip(y + dy, 0, size - 41))
                mask = np.zeros((size, size), np.uint8)
                mask[y2 : y2 + h, x2 : x2 + w] = 1
                results.append({"image_id": image_id, "category_id": cat if rng.random() < 0.9 else 1 + cat % 3,
                                "bbox": [float(x2), float(y2), float(w), float(h)], "score": float(rng.random()),
                                "segmentation": mask_to_rle(mask)})
    return gt, results


def pycocotools_stats(gt: dict, results: list[dict], iou_type: str) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--objects", type=int, default=400)
    args = parser.parse_args()
    gt, results = dense_dataset(args.images, args.objects)
    print(f"{args.images} images x {args.objects} objects, {len(results)} detections, coco preset (maxDets 100)")
    for iou_type in ("bbox", "segm"):
        start = time.perf_counter()
        ours = evaluate_coco(gt, results, iou_types=(iou_type,))[iou_type]
        fast = time.perf_counter() - start
        reference, slow = pycocotools_stats(gt, results, iou_type)
        diff = max(abs((ours[n] if ours[n] is not None else -1) - r) for n, r in zip(stat_names((1, 10, 100)), reference))
        print(f"{iou_type}: faster-coco-eval {fast:.2f} s, pycocotools {slow:.2f} s, "
              f"speed-up {slow / fast:.1f}x, max |stat diff| {diff:.1e}")


if __name__ == "__main__":
    main()
