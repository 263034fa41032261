"""``rsiseg data merge``: turn patch-level predictions back into scene coordinates."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``data merge`` flags to ``parser``."""
    parser.add_argument("--patches", required=True, metavar="PATCHES.json",
                        help="`data split` output (patch images with scene_id and offset)")
    parser.add_argument("--predictions", required=True, metavar="RESULTS.json",
                        help="COCO results on the patch image ids (RLE segmentations)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (scene_predictions.json, scene_images.json)")
    parser.add_argument("--iou", type=float, default=0.5, help="suppress duplicates at mask IoU >= this")
    parser.add_argument("--ios", type=float, default=0.7,
                        help="suppress duplicates at intersection over the smaller area >= this")
    parser.add_argument("--border-px", type=int, default=2,
                        help="a mask this close to an inner patch edge counts as cut by it")
    parser.add_argument("--policy", choices=["union", "suppress"], default="union",
                        help="union fuses the fragments of objects cut by patch borders; suppress keeps the best "
                        "one, preferring a copy that lies wholly inside a patch (default union)")
    parser.add_argument("--scenes", default=None, metavar="SCENES.json",
                        help="COCO JSON of the scenes, for their exact sizes (default: extent of the patches)")


def run(args: argparse.Namespace) -> int:
    """Merge the predictions, write the two JSON files and print a summary."""
    # Deferred imports keep `rsiseg --help` light.
    from rsiseg.data.coco_index import read_coco_json
    from rsiseg.data.merge import merge_predictions
    from rsiseg.fileio import atomic_write
    from rsiseg.inference.export import read_coco_results

    patches = read_coco_json(Path(args.patches))
    # A COCO file with an "annotations" list is accepted too; non-finite numbers are refused by name.
    predictions = read_coco_results(args.predictions, allow_dataset=True)
    scenes = read_coco_json(Path(args.scenes))["images"] if args.scenes else None
    stats: dict[str, int] = {}
    results, images = merge_predictions(predictions, patches, iou_threshold=args.iou, ios_threshold=args.ios,
                                        border_px=args.border_px, policy=args.policy,
                                        scene_images=scenes, stats=stats)
    out = Path(args.out)
    for name, data in (("scene_predictions.json", results), ("scene_images.json", images)):
        atomic_write(out / name, lambda handle, data=data: json.dump(data, handle))
    print(json.dumps({"scenes": len(images), **stats, "out_dir": str(out)}, indent=2))
    return 0
