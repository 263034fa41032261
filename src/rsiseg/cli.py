"""The ``rsiseg`` command line: ``train``, ``eval``, ``predict``, ``data`` and the model tools.

Each subcommand imports its heavy modules only when it runs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from rsiseg import __version__
from rsiseg.commands.argtypes import IncreasingInts, int_in_range, unit_float

EPILOG = """examples:
  rsiseg data synth --out data/synth --images 200 --size 256 --seed 0
  rsiseg train configs/demo_synth.yaml train.epochs=20 train.lr=0.01
  rsiseg train configs/demo_synth.yaml --resume
  rsiseg eval --checkpoint runs/demo/best.pth --preset isaid
  rsiseg predict --checkpoint runs/demo/best.pth scene.png more_images/ --out predictions
"""


# (name, help, description) of the `rsiseg data` commands whose bodies live in rsiseg/commands/data_<name>.py.
DATA_COMMANDS = [
    ("subset", "a reproducible by-image subset of a COCO instances JSON (e.g. iSAID-100 = 40%%)",
     "Keep round(fraction x images), at least 1, or --count images, drawn with numpy default_rng(seed) over the "
     "images sorted by id, so the same file and seed give the same subset whatever the image order; for one seed a "
     "smaller subset lies inside a larger one. Keeps the kept images' annotations only, in file order; categories, "
     "info, licenses and other top-level keys are copied unchanged. iSAID-100: --fraction 0.4 --seed 42."),
    ("points", "one point per object of a COCO instances JSON (the point prompts of PointSAM)",
     "Write a points JSON with one point per non-crowd annotation: --rule center takes the mask pixel farthest "
     "from the mask border (the image edge counts as border), --rule random a uniformly drawn mask pixel seeded "
     "by (seed, image id, instance), so the same file and seed give the same points. Points are (x, y) pixel "
     "centres. Crowd regions and annotations with no mask pixels are skipped and counted; the image files are "
     "not needed. Refuses to replace --out without --overwrite."),
    ("split", "cut large scenes and their annotations into overlapping patches (iSAID devkit scheme)",
     "Cut scenes into size x size patches with the given overlap (stride = size - overlap; the last patch of a "
     "row or column ends flush with the border; small images stay whole). Patch names and image entries record "
     "the offsets (Pxxxx_y1_y2_x1_x2). Instances are clipped at patch borders."),
    ("split_semantic", "cut image tiles and their label maps into patches, train/val by tile (ISPRS Potsdam)",
     "Pair the images and label maps by name (top_potsdam_2_10_RGB.tif with top_potsdam_2_10_label.tif), cut each "
     "pair into size x size patches (the last of a row or column flush with the border) and write "
     "OUT/{train,val}/images/Image_<tile>_<y>_<x>.tif (every band, the stored dtype) and "
     "OUT/{train,val}/labels/Label_<tile>_<y>_<x>.png (checked as training reads them; --label-format "
     "potsdam_rgb keeps the ISPRS colours, index writes uint8 indices). Whole tiles go to one split: "
     "--val-fraction of them by a seeded draw, or --val-tiles by name. Writes OUT/split.json and "
     "OUT/classes.json. The report's Potsdam patches: --size 300 --label-format potsdam_rgb."),
    ("merge", "turn patch-level predictions back into scene coordinates",
     "Shift patch predictions (COCO results on the patch ids of a `data split` output) into their scenes, fuse "
     "same-class instances cut by a patch border, and suppress duplicates from overlapping patches by mask IoU / "
     "IoS within each class. Writes scene_predictions.json and scene_images.json."),
    ("validate", "check every image and annotation; --fix writes a repaired copy",
     "Check files exist and open, sizes match, polygons are valid, boxes lie inside the image and agree with the "
     "mask, category and image ids are known, ids are unique. Prints a count per problem kind with examples; "
     "exits 1 on errors. --fix writes a repaired copy and says what it changed."),
    ("stats", "class counts, objects per image, box sizes and foreground ratios (JSON + PNG figures)",
     "Write stats.json, stats.md and PNG figures: instances per class, objects per image, box size distribution "
     "(32^2, 96^2 and iSAID 144^2 lines) and the foreground-pixel ratio bins of the Insight Any Instance paper "
     "(Table I)."),
    ("class_weights", "inverse pixel-frequency class weights of dense labels (semantic task)",
     "Count the pixels of each class over a folder of training label maps and write weights proportional to "
     "the inverse frequency, normalised to mean 1 over the classes present (absent classes get 0). Point "
     "model.seg.class_weights at the JSON."),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rsiseg",
        description="Instance segmentation for remote-sensing imagery: train, evaluate and predict.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rsiseg {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser = _with_common_options(sub.add_parser)
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    _add_sweep(sub)
    for name, help_text in MODULE_COMMANDS:
        _add_module_command(sub, name, help_text)
    _add_data(sub)
    return parser


def _with_common_options(add_parser: Callable[..., argparse.ArgumentParser]) -> Callable[..., argparse.ArgumentParser]:
    """Let ``-q`` also follow the subcommand (``rsiseg train cfg.yaml -q``)."""

    def add(*args, **kwargs) -> argparse.ArgumentParser:
        parser = add_parser(*args, **kwargs)
        parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                            help="only warnings and errors, no progress bars")
        return parser

    return add


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML experiment config",
        description="Train the model a config describes. Writes config.yaml, last.pth, best.pth, metrics.jsonl, "
        "curves.png and TensorBoard logs to train.output_dir; a folder holding a previous run is refused unless "
        "--resume or --overwrite is given. Ctrl-C stops with exit code 130 and keeps the last checkpoint.",
        epilog="Override any config key with section.key=value, e.g. train.lr=0.01 model.num_classes=2 "
        "train.output_dir=runs/try2. Values are read as YAML ([8, 16], null, 1e-3).",
    )
    p.add_argument("config", help="experiment YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from <train.output_dir>/last.pth exactly")
    mode.add_argument("--auto-resume", action="store_true",
                      help="--resume when <train.output_dir>/last.pth exists, else start the run: one command line "
                      "that torchrun --max-restarts can repeat after a failure")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace a previous run in train.output_dir (without it such a folder is refused)")
    p.set_defaults(handler=_run_train)


# Subcommands whose parser and body both live in rsiseg/commands/<name>.py (``add_arguments``, ``run``).
MODULE_COMMANDS = [
    ("info", "parameters by component, model size, FLOPs, FPS and peak memory of a config's model"),
    ("anchors", "anchor recall of a dataset's boxes, a k-means suggestion and an optuna search (table + YAML)"),
    ("overfit", "train on K images until the model fits them; ground truth next to predictions (a debugging aid)"),
    ("explain", "Grad-CAM of each detected instance's class score on a backbone or FPN level, as overlays"),
    ("prompt", "a mask, a class and a score for each user box on an image (box prompts)"),
    ("ablate", "train and evaluate a family's ablation variants (prompt modules; YOLACT vs RELACT) in one table"),
]


def _add_module_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    module = importlib.import_module(f"rsiseg.commands.{name}")  # light at import: heavy imports wait for run()
    p = sub.add_parser(name, help=help_text, description=module.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    p.set_defaults(handler=module.run)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    sweep = importlib.import_module("rsiseg.commands.sweep")  # defers its heavy imports to run()
    p = sub.add_parser("sweep", help="train a config once per value of a key; tabulate and plot the metrics",
                       description=sweep.__doc__)
    sweep.add_arguments(p)
    p.set_defaults(handler=_run_sweep)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (COCO AP, or accuracy and IoU) or a COCO results file",
        description="Compute the 12 COCO statistics for bbox and segm, plus per-class AP, of a checkpoint "
        "(--checkpoint; the data defaults to the validation split stored in its config) or of a COCO results "
        "file from any tool (--predictions R.json --data GT.json, e.g. data merge's scene_predictions.json). "
        "The model's classes must name the data's categories (ids may differ): --class-map maps other names. "
        "Writes metrics.json, metrics.md, a table, and with a checkpoint results.json. A semantic checkpoint gives "
        "pixel accuracy, mean class accuracy, per-class IoU and mIoU on dense labels (--data LABELS_DIR --images "
        "DIR, default its validation split). A prompted (PointSAM) checkpoint, or --config for zero-shot SAM, is "
        "prompted with one point per instance: mIoU, mask AP (scored by predicted IoU) and the box AP of the masks.",
    )
    p.add_argument("--checkpoint", help="a .pth written by rsiseg train")
    p.add_argument("--config", metavar="CONFIG.yaml",
                   help="a prompted-task config: evaluate the model it builds, untrained (zero-shot SAM from "
                   "model.sam.checkpoint); the output defaults to <train.output_dir>/zero_shot")
    p.add_argument("--predictions", metavar="RESULTS.json", help="score this COCO results file instead (needs --data)")
    p.add_argument("--data", metavar="ANNOTATIONS.json", help="COCO ground truth to evaluate on")
    p.add_argument("--images", metavar="DIR", help="image folder of --data (default: the JSON's folder)")
    p.add_argument("--preset", choices=["coco", "isaid"], help="coco: maxDets 1/10/100, areas 32^2/96^2; "
                   "isaid: maxDets 1/10/1000, areas 144^2/512^2 (default: the config's eval.preset)")
    p.add_argument("--max-dets", type=int_in_range(1), nargs=3, metavar=("D1", "D2", "D3"), action=IncreasingInts,
                   help="override the maxDets: three increasing positive integers, e.g. 1 10 1000")
    p.add_argument("--class-map", nargs="+", metavar="MODEL=DATA",
                   help="model class names that the data names differently, e.g. boat=ship")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <checkpoint or predictions folder>/eval)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--prompt-missed", action="store_true",
                   help="instead of the plain evaluation, give the ground-truth boxes of the instances the model "
                   "missed as box prompts and report AP before and after (Insight Any Instance, Table XI); "
                   "writes missed_prompts.json and missed_prompts.md")
    p.add_argument("--missed-iou", type=unit_float, default=0.5, metavar="IOU",
                   help="an instance is missed when no same-class detection scoring >= 0.05 has this box IoU "
                   "with it (default 0.5)")
    _add_inference_mode(p)
    _add_tiling(p, predict=False)
    p.set_defaults(handler=_run_eval)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict images; write COCO results JSON and overlay PNGs",
        description="Run a checkpoint on image files or folders. Writes predictions.json (COCO results with RLE "
        "masks), images.json (the image ids used there, each image's overlay and its detections kept and below "
        "the score threshold) and overlays/<stem>.png (<stem>_<image id>.png where stems repeat). Files in the "
        "folders that are not readable images are skipped and counted (--strict refuses them). An --out folder "
        "holding predictions.json is refused unless --overwrite. Images over RSISEG_MAX_PIXELS pixels (default "
        "2**30) are refused before decoding. A semantic checkpoint writes masks/<stem>.png (class indices; a "
        "GeoTIFF with the input's georeferencing for GeoTIFF inputs), colour/<stem>.png (the class palette) and "
        "images.json.",
    )
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument("--checkpoint", required=True, help="a .pth written by rsiseg train")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace the predictions of a previous run in --out")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first input that is not a readable image, instead of skipping and counting it")
    p.add_argument("--from-coco", metavar="ANNOTATIONS.json",
                   help="predict the images a COCO JSON lists; results keep its image and category ids")
    p.add_argument("--class-map", nargs="+", metavar="MODEL=DATA",
                   help="with --from-coco: model class names that the JSON names differently")
    p.add_argument("--images", metavar="DIR", help="image folder of --from-coco (default: the JSON's folder)")
    p.add_argument("--limit", type=int_in_range(1), help="predict at most this many images")
    p.add_argument("--score-threshold", type=unit_float, default=0.3,
                   help="drop detections below, in [0, 1] (default 0.3)")
    p.add_argument("--max-detections", type=int_in_range(1, 1000),
                   help="keep at most this many per image, 1..1000 (the model's limit)")
    p.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs (the overviews with --tiled)")
    p.add_argument("--batch-size", type=int_in_range(1), default=2, help="images per forward pass (default 2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    _add_inference_mode(p)
    _add_tiling(p, predict=True)
    p.set_defaults(handler=_run_predict)


def _add_inference_mode(p: argparse.ArgumentParser) -> None:
    """The inference path of ``predict`` and ``eval`` (rsiseg.inference.fast)."""
    p.add_argument("--exact", action="store_true",
                   help="do not fold the batch norms into their convolutions nor store the weights channels-last "
                   "(the default: the same outputs up to float rounding, faster)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="run the backbone (or encoder) under autocast in this dtype: bf16 (CPU or CUDA) or fp16 "
                   "(CUDA only); the heads, boxes, scores and masks stay float32 (default fp32)")
    p.add_argument("--compile", action="store_true",
                   help="compile the backbone (or encoder) with torch.compile (the first batch of each shape pays "
                   "the compile)")


def _add_tiling(p: argparse.ArgumentParser, *, predict: bool) -> None:
    """The ``--tiled`` options of ``predict`` (with the output options) and ``eval``."""
    g = p.add_argument_group(
        "whole scenes (--tiled)",
        "Scenes of any size (PNG, JPEG, TIFF, GeoTIFF) are read window by window, predicted in tiles and merged "
        "across tile borders (the `data merge` fusion and suppression). "
        + ("Writes predictions.json in scene pixels, images.json, summary.json (instances per class), "
           "vectors/<stem>.geojson or .gpkg (one polygon per instance in the raster's CRS, pixel coordinates "
           "without one) and overviews/<stem>.png." if predict else
           "Scores the merged scene predictions against the scene-level ground truth (raise --max-dets for "
           "scenes with more instances than the preset's last maxDets)."))
    g.add_argument("--tiled", action="store_true",
                   help="predict every input tiled" + (" (automatic above --tile-above)" if predict else ""))
    if predict:
        g.add_argument("--tile-above", type=int_in_range(1), default=4096, metavar="PX",
                       help="switch to --tiled when an input has a side longer than this (default 4096)")
    g.add_argument("--tile-size", type=int_in_range(32), default=800, metavar="PX", help="tile side (default 800)")
    g.add_argument("--tile-overlap", type=int_in_range(0), default=200, metavar="PX",
                   help="pixels shared by neighbouring tiles (default 200)")
    g.add_argument("--tile-batch", type=int_in_range(1), default=4, metavar="N", help="tiles per forward (default 4)")
    g.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="multi-scale pass: resize factors of every tile, e.g. 1.0 0.5 (default 1.0)")
    g.add_argument("--bands", metavar="B,B,B",
                   help="1-based raster bands in the model's band order, e.g. 3,2,1 (default: the first "
                   "model.in_channels bands; a 1-band scene is repeated to 3 bands for a 3-band model)")
    g.add_argument("--merge", choices=["union", "suppress"], default="union",
                   help="cross-tile merge: union fuses the fragments of objects cut by tile borders, suppress "
                   "keeps the best one, preferring a copy that lies wholly inside a tile (default union)")
    g.add_argument("--merge-iou", type=unit_float, default=0.5, help="suppress duplicates at mask IoU >= this")
    g.add_argument("--merge-ios", type=unit_float, default=0.7,
                   help="suppress duplicates at intersection over the smaller mask >= this")
    if predict:
        g.add_argument("--vector-format", choices=["geojson", "gpkg", "none"], default="geojson",
                       help="polygon output (default geojson)")
        g.add_argument("--simplify", type=float, default=0.5, metavar="PX",
                       help="polygon simplification tolerance in pixels, 0 keeps pixel edges (default 0.5)")
        g.add_argument("--overview-size", type=int_in_range(64), default=2048, metavar="PX",
                       help="longer side of overviews/<stem>.png (default 2048)")


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="dataset tools: synthetic data, ...", description="Dataset tools.")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    data_sub.add_parser = _with_common_options(data_sub.add_parser)
    s = data_sub.add_parser(
        "synth",
        help="write a synthetic aerial COCO dataset",
        description="Write a deterministic synthetic aerial scene dataset (roads, fields, water; small vehicles, "
        "ships, storage tanks and planes with shadows and clutter) as PNGs plus COCO JSONs "
        "OUT/annotations/instances_{train,val}.json.",
    )
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--images", type=int, default=40, help="number of images (default 40)")
    s.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--val-fraction", type=float, default=0.25)
    s.add_argument("--object-scale", type=float, default=1.0,
                   help="multiply every object's dimensions (default 1; 2 gives objects twice as long and wide)")
    s.add_argument("--style", choices=["optical", "sar"], default="optical",
                   help="instance scenes as optical RGB (default) or as speckled SAR-like intensity (a domain shift)")
    s.add_argument("--task", choices=["instance", "semantic"], default="instance",
                   help="instance: COCO JSONs (default); semantic: OUT/images/{train,val}, OUT/labels/{train,val} "
                   "(uint8 class indices of six Potsdam-like classes) and OUT/classes.json")
    s.set_defaults(handler=_run_synth)
    convert = importlib.import_module("rsiseg.commands.data_convert")  # defers its heavy imports to run()
    c = data_sub.add_parser("convert", help="convert a published dataset format to COCO", description=convert.DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_arguments(c)
    c.set_defaults(handler=_run_convert)
    for name, help_text, description in DATA_COMMANDS:
        module = importlib.import_module(f"rsiseg.commands.data_{name}")  # each defers its heavy imports to run()
        sp = data_sub.add_parser(name.replace("_", "-"), help=help_text, description=description)
        module.add_arguments(sp)
        sp.set_defaults(handler=module.run)


def _run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rsiseg.config import load_config
    from rsiseg.engine.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    try:
        resume = args.resume or (args.auto_resume and (Path(cfg.train.output_dir) / "last.pth").is_file())
        Trainer(cfg, resume=resume, progress=not args.quiet, overwrite=args.overwrite).fit()
    except KeyboardInterrupt as err:  # Ctrl-C: one line, no traceback; every file is written atomically
        print(f"rsiseg train: {str(err) or 'interrupted before training started'}", file=sys.stderr)
        return 130
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from rsiseg.commands.sweep import run

    try:
        return run(args)
    except KeyboardInterrupt as err:  # finished runs are kept; the interrupted one resumes on the next sweep
        print(f"rsiseg sweep: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130


def _run_eval(args: argparse.Namespace) -> int:
    from rsiseg.commands.evaluate import run_eval

    return run_eval(args)


def _run_predict(args: argparse.Namespace) -> int:
    from rsiseg.commands.predict import run_predict

    return run_predict(args)


def _run_synth(args: argparse.Namespace) -> int:
    if args.task == "semantic" and (args.style != "optical" or args.object_scale != 1.0):
        raise ValueError("--style and --object-scale apply to the instance scenes, not --task semantic")
    if args.task == "semantic":
        from rsiseg.data.synthetic_semantic import write_synthetic_semantic_dataset

        paths = write_synthetic_semantic_dataset(args.out, images=args.images, size=args.size, seed=args.seed,
                                                 val_fraction=args.val_fraction)
        for name, path in paths.items():
            print(f"{name:>8}: {path}")
        return 0
    from rsiseg.data.synthetic import SynthSpec, write_synthetic_dataset

    spec = SynthSpec(images=args.images, size=args.size, seed=args.seed, val_fraction=args.val_fraction,
                     object_scale=args.object_scale, style=args.style)
    paths = write_synthetic_dataset(args.out, spec, progress=not args.quiet)
    for name, path in paths.items():
        print(f"{name:>6}: {path}")
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from rsiseg.commands.data_convert import run_convert

    return run_convert(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (ValueError, OSError) as err:  # config, data and file errors carry a full message
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        print(f"rsiseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, leave the process group train, eval or predict joined (torch is not imported here)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
