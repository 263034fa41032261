"""``rsiseg predict --tiled``: whole scenes of any size, merged across tiles, with georeferenced output.

Each scene streams through the model and its outputs (:class:`SceneOutputs`): its instances are written
as soon as they are final, so memory does not grow with the scene. Writes, all staged and moved into
``--out`` only when every scene is done:

* ``predictions.json``: COCO results (RLE masks) in scene pixel coordinates;
* ``images.json``: each scene's id, size, bands, CRS, transform, tile counts and instances per class;
* ``vectors/<stem>.geojson`` (or ``.gpkg``): one polygon per instance in the raster's CRS;
* ``overviews/<stem>.png``: the scene downsampled with the instances outlined;
* ``summary.json``: instances per class, per scene and in all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from rsiseg.commands.predict import IMAGE_SUFFIXES, check_out_folder, output_categories, overlay_stems, shared_staging
from rsiseg.data.coco_index import read_coco_json
from rsiseg.engine.distributed import Distributed, gather_sorted, init_distributed, rank_device_name
from rsiseg.inference.fast import FastOptions
from rsiseg.inference.predictor import LoadedModel, model_from_state, stored_config
from rsiseg.inference.raster import RasterScene, scene_size
from rsiseg.inference.scene_outputs import SceneOutputs, join_scene_results
from rsiseg.inference.tiled import TileOptions, stream_scene

log = logging.getLogger(__name__)


def tile_options(args: argparse.Namespace, score_threshold: float) -> TileOptions:
    """The tiling and merge options of a ``predict`` or ``eval`` command line."""
    if args.tile_overlap >= args.tile_size:
        raise ValueError(f"--tile-overlap {args.tile_overlap} must be smaller than --tile-size {args.tile_size}")
    if any(not 0 < s <= 4 for s in args.scales):
        raise ValueError(f"--scales must be in (0, 4], got {args.scales}")
    return TileOptions(size=args.tile_size, overlap=args.tile_overlap, batch_size=args.tile_batch,
                       scales=tuple(args.scales), score_threshold=score_threshold, policy=args.merge,
                       iou_threshold=args.merge_iou, ios_threshold=args.merge_ios)


def warn_if_resized(loaded: LoadedModel, options: TileOptions) -> None:
    """Warn when the model's own resize will rescale the tiles (a square tile is resized to ``model.min_size``)."""
    min_size = loaded.config.model.min_size
    if options.size != min_size:
        log.warning("the model resizes each %d px tile to %d px (its model.min_size): objects are seen %.2fx their "
                    "size; pass --tile-size %d to predict at the scale it was trained at",
                    options.size, min_size, min_size / options.size, min_size)


def parse_bands(text: str | None) -> list[int] | None:
    """``--bands 3,2,1`` as ``[3, 2, 1]``; None when not given."""
    if not text:
        return None
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise ValueError(f"--bands takes 1-based band numbers separated by commas, e.g. 3,2,1; got {text!r}") from None


def predict_coco_scenes(loaded: LoadedModel, coco: dict[str, Any], images_root: Path, options: TileOptions,
                        bands: list[int] | None, progress: bool, dist: Distributed | None = None) -> list[dict[str, Any]]:
    """Tiled predictions of every scene a COCO JSON lists, as COCO results on its image ids (``eval --tiled``).

    With ``dist`` (torchrun), each rank predicts every N-th scene and every rank gets all the results, in
    the single process's order.

    Raises:
        ValueError: a scene's size differs from its JSON entry (named).
    """
    dist = dist or Distributed()
    results = []
    for image in coco["images"][dist.rank::dist.world_size]:
        path = images_root / image["file_name"]
        with RasterScene(path, bands, loaded.config.model.in_channels) as scene:
            if (scene.height, scene.width) != (int(image["height"]), int(image["width"])):
                raise ValueError(f"{path}: the scene is {scene.width} x {scene.height} px but image {image['id']} "
                                 f"of the JSON says {image['width']} x {image['height']}")
            for items in stream_scene(loaded, scene, options, progress=progress):
                results += [item.to_result(int(image["id"])) for item in items]
    position = {int(image["id"]): i for i, image in enumerate(coco["images"])}
    return gather_sorted(dist, results, key=lambda r: position[r["image_id"]], what="gathering the scenes' results")


def tiled_overrides(args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    """The stored model options that ``predict --tiled`` changes: ``--max-detections``, and the model's own
    score floor ``box_score_thresh`` raised to ``--score-threshold``.

    The tiled path drops every detection below ``--score-threshold`` (the non-tiled one counts them in its
    report), so the mask head need not run on them: with the R50 model on 256 px tiles it took 36 of the 43 s
    of predicting a 1024² scene (cProfile) before this, and the 4096² bench ran 3.1x faster after. The kept detections do not change (up to float rounding at the NMS
    threshold and ties): the floor is applied before the class-wise NMS and the top-``detections_per_img``
    cut, and neither lets a lower score remove a higher one; YOLACT's ranking score is never above the class
    confidence its floor applies to. The floor is one float32 step under the threshold, since torchvision keeps
    scores strictly above its floor (the scores are float32 under ``--precision`` too: only the backbone runs
    in it).
    """
    overrides: dict[str, Any] = {"detections_per_img": args.max_detections} if args.max_detections else {}
    floor = float(np.nextafter(np.float32(args.score_threshold), np.float32(-np.inf)))
    if floor > stored_config(state, args.checkpoint).model.box_score_thresh:
        overrides["box_score_thresh"] = floor
    return overrides


def needs_tiling(args: argparse.Namespace) -> bool:
    """``--tiled``, or an input file with a side longer than ``--tile-above`` pixels."""
    if args.tiled:
        return True
    for path in _listed_files(args.inputs):
        size = scene_size(path)
        if size is not None and max(size) > args.tile_above:
            log.info("%s is %d x %d px (over --tile-above %d): predicting every input tiled",
                     path, size[1], size[0], args.tile_above)
            return True
    return False


def run_tiled_predict(args: argparse.Namespace, state: dict[str, Any], outputs: tuple[str, ...]) -> int:
    """Predict every scene tiled and write the outputs listed in the module docstring."""
    options = tile_options(args, args.score_threshold)
    out = Path(args.out)
    dist = init_distributed(args.device)  # under torchrun: each process predicts every N-th scene
    dist.main_only(lambda: check_out_folder(out, args.overwrite, outputs), "checking --out")
    coco = read_coco_json(Path(args.from_coco)) if args.from_coco else None
    scenes = _scene_inputs(args, coco)
    loaded = model_from_state(state, rank_device_name(dist, args.device), tiled_overrides(args, state),
                              source=args.checkpoint, fast=FastOptions.from_args(args))
    categories, label_to_category = output_categories(loaded, args, coco)
    loaded.label_to_category = label_to_category
    names = {c["id"]: c["name"] for c in categories}
    warn_if_resized(loaded, options)
    with shared_staging(out, outputs, dist) as staging:
        mine = list(enumerate(zip(scenes, overlay_stems(scenes))))[dist.rank::dist.world_size]
        entries = [(index, _predict_one(path, index, image_id, stem, loaded, options, names, staging, args))
                   for index, ((path, image_id), stem) in mine]
        # Every rank has closed its scenes' files once the gather returns.
        indexed = gather_sorted(dist, entries, key=lambda e: e[0], what="gathering the scene entries")
        if not dist.is_main:
            return 0
        entries = [entry for _, entry in indexed]
        totals = sum((Counter(e["counts"]) for e in entries), Counter())
        summary = {"scenes": [{"file_name": e["file_name"], "instances": e["instances"], "counts": e["counts"]}
                              for e in entries], "total": dict(totals)}
        join_scene_results(staging, [index for index, _ in indexed])
        (staging / "images.json").write_text(json.dumps({"images": entries, "categories": categories,
                                                         "score_threshold": args.score_threshold}, indent=1))
        (staging / "summary.json").write_text(json.dumps(summary, indent=1))
    for e in entries:
        print(f"{e['file_name']}: {e['instances']} instances ({e['tiles']} tiles, "
              f"{e.get('tiles_skipped_nodata', 0)} all-nodata skipped): {e['counts']}")
    print(f"wrote {out / 'predictions.json'}, {out / 'images.json'}, {out / 'summary.json'}"
          + ("" if args.vector_format == "none" else f", {out / 'vectors'}/")
          + ("" if args.no_overlays else f" and {out / 'overviews'}/"))
    return 0


def _predict_one(path: Path, index: int, image_id: int, stem: str, loaded: LoadedModel, options: TileOptions,
                 names: dict[int, str], staging: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Predict the run's ``index``-th scene, streaming its results, vectors and overview into ``staging``;
    its images.json entry."""
    with RasterScene(path, parse_bands(args.bands), loaded.config.model.in_channels) as scene:
        if not scene.georeferenced and args.vector_format != "none":
            log.warning("%s has no CRS: its polygons are written in pixel coordinates (x right, y down)", path)
        stats: dict[str, int] = {}
        with SceneOutputs(scene, index, image_id, stem, staging, names, loaded.label_to_category,
                          vector_format=args.vector_format, simplify=args.simplify,
                          overview_size=0 if args.no_overlays else args.overview_size) as outputs, \
                contextlib.closing(stream_scene(loaded, scene, options, not args.quiet, stats)) as batches:
            for items in batches:
                outputs.add(items)
            return {"id": image_id, **scene.describe(), **stats, **outputs.finish()}


def _listed_files(inputs: list[str]) -> list[Path]:
    """The image files among ``inputs`` and in its folders (sorted, non-recursive)."""
    files = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        candidates = sorted(path.iterdir()) if path.is_dir() else [path]
        files += [p for p in candidates if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or p == path)]
    return files


def _scene_inputs(args: argparse.Namespace, coco: dict[str, Any] | None) -> list[tuple[Path, int]]:
    """``(path, image id)`` of every scene: a ``--from-coco`` JSON's ids first, then the files numbered after."""
    listed: list[tuple[Path, int]] = []
    if coco is not None:
        root = Path(args.images) if args.images else Path(args.from_coco).parent
        listed += [(root / img["file_name"], int(img["id"])) for img in coco["images"]]
    next_id = max((i for _, i in listed), default=0) + 1
    listed += [(path, next_id + k) for k, path in enumerate(_listed_files(args.inputs))]
    if args.limit is not None:
        listed = listed[:args.limit]
    if not listed:
        raise ValueError("no scenes to predict: pass image files, folders or --from-coco")
    return listed
