"""``rsiseg predict``: COCO result JSON and overlay PNGs for image files, folders or a COCO list.

Everything is written into a hidden staging folder inside ``--out`` and moved into place only
when every image is done, so a refused, failed or interrupted run leaves nothing behind and a
previous run is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rsiseg.checkpoint import load_checkpoint
from rsiseg.data.coco_index import read_coco_json
from rsiseg.data.io import (
    ImageReadError,
    ImageTooLargeError,
    check_image_header,
    match_bands,
    read_image,
    to_unit_float,
)
from rsiseg.data.loader import to_chw_tensor
from rsiseg.engine.distributed import Distributed, gather_sorted, init_distributed, rank_device_name
from rsiseg.fileio import remove_path
from rsiseg.inference.classes import map_labels_to_categories, parse_class_map
from rsiseg.inference.export import prediction_to_coco, write_coco_results
from rsiseg.inference.fast import FastOptions
from rsiseg.inference.predictor import LoadedModel, model_from_state, predict_images, stored_config
from rsiseg.inference.visualize import save_overlay, to_display_rgb

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
# What a predict run writes into --out, plain or tiled; --overwrite replaces exactly these.
OUTPUTS = ("predictions.json", "images.json", "overlays", "vectors", "overviews", "summary.json")
_STAGING_PREFIX = ".predict-"


@dataclass(frozen=True)
class ImageInput:
    """One image to predict: its file, COCO id, overlay name (no suffix), and whether it must be readable."""

    path: Path
    image_id: int
    stem: str
    required: bool


@dataclass
class Inputs:
    """The images to predict and the inputs skipped, ``(path, reason)``."""

    images: list[ImageInput]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def collect_images(
    inputs: list[str], from_coco: str | None, images_dir: str | None, limit: int | None, strict: bool = False,
    coco: dict[str, Any] | None = None,
) -> Inputs:
    """The readable images of files, folders (sorted, non-recursive) and/or a COCO JSON, headers checked.

    Images listed by ``from_coco`` keep that JSON's ids and must all be readable (they are scored
    against it); the others are numbered after them. A folder entry or file that is not a
    readable image is skipped and counted, or refused with ``strict``. Overlay stems are the file
    stems, with ``_<image id>`` added where stems repeat (e.g. ``a/x.png`` and ``b/x.png``).
    ``coco`` is ``from_coco`` already read, when the caller has it.

    Raises:
        FileNotFoundError: an input does not exist (named).
        ImageTooLargeError: an image is over the pixel limit (always refused: it is an image).
        ImageReadError: a ``from_coco`` image, or with ``strict`` any input, is not a readable image.
        ValueError: nothing to predict.
    """
    listed: list[tuple[Path, int | None]] = []
    if from_coco:
        root = Path(images_dir) if images_dir else Path(from_coco).parent
        coco = coco if coco is not None else read_coco_json(Path(from_coco))
        listed += [(root / img["file_name"], int(img["id"])) for img in coco["images"]]
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        listed += [(p, None) for p in (sorted(path.iterdir()) if path.is_dir() else [path])]

    found = Inputs([])
    next_id = max((i for _, i in listed if i is not None), default=0) + 1
    chosen: list[tuple[Path, int, bool]] = []
    for path, image_id in listed:
        if limit is not None and len(chosen) == limit:
            break
        required_by = "--from-coco" if image_id is not None else "--strict" if strict else None
        reason = _unreadable_reason(path, required_by)
        if reason:
            found.skipped.append((path, reason))
            continue
        if image_id is None:
            image_id, next_id = next_id, next_id + 1
        chosen.append((path, image_id, required_by is not None))
    if not chosen:
        skipped = f" ({len(found.skipped)} inputs skipped: {_examples(found.skipped)})" if found.skipped else ""
        raise ValueError(f"no images to predict: pass image files, folders or --from-coco{skipped}")
    stems = overlay_stems([(p, i) for p, i, _ in chosen])
    found.images = [ImageInput(p, i, stem, required) for (p, i, required), stem in zip(chosen, stems)]
    return found


def overlay_stems(images: list[tuple[Path, int]]) -> list[str]:
    """Unique, deterministic overlay names: the stem, or ``<stem>_<image id>`` where stems repeat."""
    counts = Counter(path.stem for path, _ in images)
    used: set[str] = set()
    stems = []
    for path, image_id in images:
        stem = path.stem if counts[path.stem] == 1 else f"{path.stem}_{image_id}"
        base, k = stem, 1
        while stem in used or (stem != path.stem and counts[stem]):  # never take another file's own stem
            stem, k = f"{base}_{k}", k + 1
        used.add(stem)
        stems.append(stem)
    return stems


def run_predict(args: argparse.Namespace) -> int:
    """Predict every image; write ``predictions.json``, ``images.json`` and ``overlays/*.png``.

    Returns:
        0, or 130 when interrupted (Ctrl-C), with nothing written.
    """
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("rsiseg predict: interrupted; nothing was written", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    state = load_checkpoint(args.checkpoint)
    if stored_config(state, args.checkpoint).task == "semantic":
        from rsiseg.commands.predict_semantic import run_semantic_predict

        return run_semantic_predict(args, state)
    from rsiseg.commands.predict_tiled import needs_tiling, run_tiled_predict

    if needs_tiling(args):
        return run_tiled_predict(args, state, OUTPUTS)
    out = Path(args.out)
    dist = init_distributed(args.device)  # under torchrun: each process predicts every N-th image
    dist.main_only(lambda: check_out_folder(out, args.overwrite), "checking --out")
    coco = read_coco_json(Path(args.from_coco)) if args.from_coco else None
    found = collect_images(args.inputs, args.from_coco, args.images, args.limit, args.strict, coco)
    overrides = {"detections_per_img": args.max_detections} if args.max_detections else None
    loaded = model_from_state(state, rank_device_name(dist, args.device), overrides, source=args.checkpoint,
                              fast=FastOptions.from_args(args))
    categories, label_to_category = output_categories(loaded, args, coco)
    with shared_staging(out, OUTPUTS, dist) as staging:
        results, entries = predict_shard(found, dist, lambda part: _predict_all(part, loaded, label_to_category,
                                                                                 staging, args, not dist.is_main))
        if dist.is_main:
            images_json = {"images": entries, "categories": categories, "score_threshold": args.score_threshold,
                           "skipped": [{"file_name": str(p), "reason": r} for p, r in found.skipped]}
            write_coco_results(results, staging / "predictions.json")
            (staging / "images.json").write_text(json.dumps(images_json, indent=1))
    if not dist.is_main:
        return 0
    _report(results, entries, found.skipped, args.score_threshold)
    print(f"wrote {out / 'predictions.json'}, {out / 'images.json'}"
          + ("" if args.no_overlays else f" and {out / 'overlays'}/"))
    return 0


def check_out_folder(out: Path, overwrite: bool, outputs: tuple[str, ...] = OUTPUTS) -> None:
    """Refuse an ``--out`` that is a file, or holds a previous run's ``outputs`` unless ``overwrite``; clear stale staging."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    found = [name for name in outputs if (out / name).exists()]
    if found and not overwrite:
        raise FileExistsError(f"--out {out} already holds a previous run's {', '.join(found)}: pass --overwrite "
                              "to replace it, or choose another --out")
    for stale in sorted(out.glob(f"{_STAGING_PREFIX}*.tmp")) if out.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
        log.info("removed %s, left by an interrupted predict run", stale)


def _unreadable_reason(path: Path, required_by: str | None) -> str | None:
    """Why ``path`` is no readable image (None when it is one); raises instead when ``required_by`` an option."""
    if path.is_dir():
        reason = "a folder (inputs are not searched recursively)"
    elif path.suffix.lower() not in IMAGE_SUFFIXES:
        reason = f"not an image file ({path.suffix or 'no suffix'})"
    else:
        try:
            check_image_header(path)
            return None
        except ImageTooLargeError:
            raise
        except ImageReadError as err:
            reason = str(err).removeprefix(f"{path}: ")
    if required_by == "--strict":
        raise ImageReadError(f"{path}: {reason} (refused by --strict; without it such inputs are skipped and counted)")
    if required_by:
        raise ImageReadError(f"{path}: {reason} (an image listed in {required_by})")
    return reason


def output_categories(loaded: LoadedModel, args: argparse.Namespace,
                coco: dict[str, Any] | None) -> tuple[list[dict[str, Any]], list[int]]:
    """The categories to write and each label's category id: the ``--from-coco`` JSON's, else the model's."""
    if coco is None:
        categories = [{"id": c, "name": n} for c, n in zip(loaded.label_to_category, loaded.class_names)]
        return categories, loaded.label_to_category
    categories = coco["categories"]  # results are scored against this JSON
    label_to_category = map_labels_to_categories(
        loaded.class_names, loaded.label_to_category, categories, parse_class_map(args.class_map),
        model_source=str(args.checkpoint), data_source=str(args.from_coco))
    return categories, label_to_category


Outputs = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # COCO results ("image_id"), image entries ("id")


def predict_shard(found: Inputs, dist: Distributed, predict: Callable[[Inputs], Outputs]) -> Outputs:
    """``predict`` on this rank's share of ``found`` (every N-th image), the shares merged in image order: the
    results and entries one process gives. ``found.skipped`` gets every rank's decoding failures."""
    if not dist.enabled:
        return predict(found)
    position = {item.image_id: i for i, item in enumerate(found.images)}
    listed = len(found.skipped)
    mine = Inputs(images=found.images[dist.rank::dist.world_size], skipped=list(found.skipped))
    results, entries = predict(mine)
    results = gather_sorted(dist, results, key=lambda r: position[r["image_id"]], what="gathering the predictions")
    entries = gather_sorted(dist, entries, key=lambda e: position[e["id"]], what="gathering the image entries")
    found.skipped += [s for part in dist.gather(mine.skipped[listed:], "gathering the skipped images") for s in part]
    return results, entries


def _predict_all(
    found: Inputs, loaded: LoadedModel, label_to_category: list[int], staging: Path, args: argparse.Namespace,
    quiet: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """COCO results and ``images.json`` entries of every image; overlays go to ``staging/overlays``.

    Images whose pixels fail to decode (the header was fine) are skipped and added to
    ``found.skipped``, unless required (``--strict``, ``--from-coco``): then the error stands.
    """
    results: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    batches = range(0, len(found.images), args.batch_size)
    for start in tqdm(batches, desc="predict", disable=args.quiet or quiet):
        batch, tensors = [], []
        for item in found.images[start : start + args.batch_size]:
            array = decode_or_skip(item, found)
            if array is not None:
                array = to_unit_float(match_bands(array, loaded.config.model.in_channels, item.path))
                batch.append(item)
                tensors.append(to_chw_tensor(array))
        if not batch:
            continue
        for item, image, pred in zip(batch, tensors, predict_images(loaded.model, tensors, loaded.device)):
            kept = prediction_to_coco(pred, item.image_id, label_to_category, score_threshold=args.score_threshold,
                                      max_detections=args.max_detections)
            scores = pred["scores"].detach().cpu()
            below = scores[scores < args.score_threshold]
            results += kept
            entry = {"id": item.image_id, "file_name": str(item.path), "height": image.shape[1],
                     "width": image.shape[2], "detections": len(kept), "below_threshold": len(below),
                     "best_below": round(float(below.max()), 4) if len(below) else None}
            if not args.no_overlays:
                entry["overlay"] = f"overlays/{item.stem}.png"
                save_overlay(staging / entry["overlay"], to_display_rgb(image), pred, loaded.class_names,
                             score_threshold=args.score_threshold)
            entries.append(entry)
    return results, entries


def decode_or_skip(item: ImageInput, found: Inputs) -> np.ndarray | None:
    """The image's pixels, or None (recorded in ``found.skipped``) when an optional image fails to decode."""
    try:
        return read_image(item.path)
    except ImageReadError as err:
        if item.required or isinstance(err, ImageTooLargeError):
            raise
        found.skipped.append((item.path, str(err).removeprefix(f"{item.path}: ")))
        return None


def _report(results: list[dict[str, Any]], entries: list[dict[str, Any]], skipped: list[tuple[Path, str]],
            threshold: float) -> None:
    """Print the run's counts, the detections hidden by the threshold, and warn about skipped inputs."""
    below = sum(e["below_threshold"] for e in entries)
    print(f"{len(results)} detections in {len(entries)} images (score >= {threshold:g})")
    if below:
        best = max(e["best_below"] for e in entries if e["best_below"] is not None)
        hidden_in = sum(1 for e in entries if e["below_threshold"])
        print(f"{below} detections in {hidden_in} images were below the score threshold {threshold:g} (best "
              f"{best:.3f}); lower --score-threshold to keep them (counts per image in images.json)")
    report_skipped(skipped)


def report_skipped(skipped: list[tuple[Path, str]]) -> None:
    """Warn about the inputs that were skipped, with a few examples."""
    if skipped:
        log.warning("skipped %d input(s) that are not readable images (--strict refuses them): %s",
                    len(skipped), _examples(skipped))


def _examples(skipped: list[tuple[Path, str]], show: int = 3) -> str:
    text = "; ".join(f"{path}: {reason}" for path, reason in skipped[:show])
    return text + (f"; and {len(skipped) - show} more (listed in images.json)" if len(skipped) > show else "")


@contextlib.contextmanager
def shared_staging(out: Path, outputs: tuple[str, ...], dist: Distributed) -> Iterator[Path]:
    """:func:`staged_outputs` of rank 0, whose folder every rank writes its files into (a shared ``--out``).

    Rank 0 publishes the folder when its block ends, after the gathers that end every rank's share.
    """
    if dist.is_main:
        with staged_outputs(out, outputs) as staging:
            dist.broadcast(str(staging), "sharing the staging folder")
            yield staging
    else:
        yield Path(dist.broadcast(None, "sharing the staging folder"))


@contextlib.contextmanager
def staged_outputs(out: Path, outputs: tuple[str, ...] = OUTPUTS) -> Iterator[Path]:
    """A staging folder inside ``out`` for a run's ``outputs``, moved into place only when the block succeeds.

    On any error (Ctrl-C included) the staged files and the folders this run created are removed,
    leaving nothing partial and the previous run's outputs untouched.
    """
    created, staging = _make_dirs(out), None
    try:
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, suffix=".tmp", dir=out))
        yield staging
        _publish(staging, out, outputs)
    except BaseException:
        _discard(staging, created)
        raise


def _make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the created ones, deepest first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _publish(staging: Path, out: Path, outputs: tuple[str, ...]) -> None:
    """Replace the previous run's ``outputs`` in ``out`` by the staged ones, then remove ``staging``."""
    for name in outputs:
        old = out / name
        remove_path(old)
        if (staging / name).exists():
            os.replace(staging / name, old)
    staging.rmdir()


def _discard(staging: Path | None, created: list[Path]) -> None:
    """Remove the staged outputs and the folders this run created, leaving nothing partial."""
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break
