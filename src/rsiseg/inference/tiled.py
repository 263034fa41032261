"""Whole-scene prediction: overlapping tiles, batched through the model, merged across tile borders.

The scene is read one batch of windows at a time (:class:`RasterScene`), each detection's mask is
pasted inside its box only and kept cropped (:class:`SceneItem`), and the cross-tile merge is the
one ``rsiseg data merge`` uses, run band by band as the tile rows arrive (:class:`StreamingMerge`):
:func:`stream_scene` gives out each instance as soon as no later tile can change it. Memory therefore
follows the tile batch and the detections not yet final (about two rows of tiles' worth when the
overlap is at most half a tile and no chain of overlapping boxes runs down the scene), never the scene
area nor its instance count.

An optional multi-scale pass predicts every tile again with the model's input resize scaled by each
extra factor; the boxes come back in tile pixels and the duplicates go through the same merge.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from rsiseg.data.io import match_bands, to_unit_float
from rsiseg.data.loader import to_chw_tensor
from rsiseg.data.merge import SceneItem, make_item
from rsiseg.data.merge_stream import StreamingMerge
from rsiseg.data.tiling import patch_windows
from rsiseg.inference.paste import iter_windows
from rsiseg.inference.predictor import LoadedModel, predict_images
from rsiseg.inference.raster import RasterScene, Window


@dataclass(frozen=True)
class TileOptions:
    """How a scene is tiled and merged.

    Attributes:
        size: tile side in pixels.
        overlap: pixels shared by neighbouring tiles; objects up to about this size are seen whole
            in at least one tile.
        batch_size: tiles per forward pass.
        scales: resize factors of the tiles, 1.0 first (e.g. ``(1.0, 0.5)`` adds a half-size pass).
        score_threshold: detections below are dropped before the merge.
        mask_threshold: a pixel is foreground when its probability is above this.
        policy: cross-tile merge, ``union`` or ``suppress`` (see :mod:`rsiseg.data.merge`).
        iou_threshold, ios_threshold, border_px: merge thresholds (see :func:`merge_scene_items`).
    """

    size: int = 800
    overlap: int = 200
    batch_size: int = 4
    scales: tuple[float, ...] = (1.0,)
    score_threshold: float = 0.3
    mask_threshold: float = 0.5
    policy: str = "union"
    iou_threshold: float = 0.5
    ios_threshold: float = 0.7
    border_px: int = 2


@dataclass
class SceneResult:
    """The merged instances of one scene and what the run counted.

    Attributes:
        items: the merged detections in scene pixels.
        stats: ``tiles``, ``tiles_skipped_nodata``, ``detections`` (before the merge), ``fused``,
            ``suppressed``, ``instances`` (after it).
    """

    items: list[SceneItem]
    stats: dict[str, int] = field(default_factory=dict)


def predict_scene(loaded: LoadedModel, scene: RasterScene, options: TileOptions,
                  progress: bool = True) -> SceneResult:
    """Predict every tile of ``scene`` and merge the detections across tile borders, all held in memory.

    :func:`stream_scene` gives the same instances without holding them; this collects them (tests,
    small scenes).

    Raises:
        ValueError: every pixel of the scene is nodata (nothing to predict).
        ImageReadError: a window cannot be decoded (corrupt or truncated file).
    """
    stats: dict[str, int] = {}
    items = [item for batch in stream_scene(loaded, scene, options, progress, stats) for item in batch]
    return SceneResult(items, stats)


def stream_scene(loaded: LoadedModel, scene: RasterScene, options: TileOptions, progress: bool = True,
                 stats: dict[str, int] | None = None) -> Iterator[list[SceneItem]]:
    """Predict the tiles of ``scene`` row by row and yield its merged instances as soon as they are final.

    Each yielded batch holds the instances that no later tile can touch (see
    :class:`~rsiseg.data.merge_stream.StreamingMerge`), so memory follows the tile batch and the
    undecided detections (about two tile rows' worth), whatever the scene's size. Together the batches
    hold exactly the instances of a merge of the whole scene (in another order: band by band, then by
    class).

    Args:
        stats: if given, filled with the counts of :class:`SceneResult` as the scene goes.

    Raises:
        ValueError: every pixel of the scene is nodata (nothing to predict), after the last tile.
        ImageReadError: a window cannot be decoded (corrupt or truncated file).
    """
    windows = patch_windows(scene.height, scene.width, options.size, options.overlap)
    stats = stats if stats is not None else {}
    stats.update(tiles=len(windows), tiles_skipped_nodata=0, detections=0, fused=0, suppressed=0, instances=0)
    merge = StreamingMerge(scene.height, scene.width, stats, policy=options.policy,
                           iou_threshold=options.iou_threshold, ios_threshold=options.ios_threshold,
                           border_px=options.border_px)
    released_to = 0.0  # nothing ends above row 0
    with tqdm(total=len(windows), desc=f"tiles of {scene.path.name}", unit="tile", disable=not progress) as bar:
        for start in range(0, len(windows), options.batch_size):
            end = min(start + options.batch_size, len(windows))
            items = _batch_items(loaded, scene, windows, range(start, end), options, stats)
            merge.add(items)
            stats["detections"] += len(items)
            bar.update(end - start)
            frontier = windows[end][0] if end < len(windows) else math.inf  # row-major: later tiles start here
            if frontier > released_to:
                released_to = frontier
                final = merge.release(frontier)
                stats["instances"] += len(final)
                if final:
                    yield final
    if stats["tiles_skipped_nodata"] == len(windows):
        raise ValueError(f"{scene.path}: every pixel is nodata; there is nothing to predict")


def _batch_items(loaded: LoadedModel, scene: RasterScene, windows: list[Window], batch: range,
                 options: TileOptions, stats: dict[str, int]) -> list[SceneItem]:
    """The detections of the tiles ``windows[batch]`` in scene pixels; all-nodata tiles are skipped and counted."""
    tensors, read = [], []
    for source in batch:
        pixels, valid = scene.read(windows[source])
        if not valid.any():
            stats["tiles_skipped_nodata"] += 1
            continue
        bands = match_bands(pixels, loaded.config.model.in_channels, scene.path)
        tensors.append(to_chw_tensor(to_unit_float(bands)))
        read.append(source)
    items: list[SceneItem] = []
    if tensors:
        for source, pred in zip(read, _predict_scales(loaded, tensors, options)):
            items += tile_items(pred, windows[source], (scene.height, scene.width), loaded.label_to_category,
                                options, source=source)
    return items


def _predict_scales(loaded: LoadedModel, tensors: list[torch.Tensor],
                    options: TileOptions) -> list[dict[str, torch.Tensor]]:
    """Each tile's predictions at every scale, boxes in tile pixels, concatenated per tile."""
    per_tile: list[list[dict[str, torch.Tensor]]] = [[] for _ in tensors]
    for scale in options.scales:
        with _input_scale(loaded.model, scale), torch.inference_mode():
            preds = predict_images(loaded.model, tensors, loaded.device)
        for outputs, pred in zip(per_tile, preds):
            if "roi_masks" not in pred:
                raise ValueError("tiled prediction needs a model that predicts masks (no 'roi_masks' in its output)")
            outputs.append(pred)
    return [{key: torch.cat([p[key] for p in outputs]) for key in ("boxes", "labels", "scores", "roi_masks")}
            for outputs in per_tile]


@contextlib.contextmanager
def _input_scale(model: torch.nn.Module, scale: float) -> Iterator[None]:
    """Make the model's own resize (``model.transform``) ``scale`` times its usual size, for one pass.

    Resizing the tiles instead would be undone by that transform; its postprocess maps the boxes
    back to tile pixels either way.
    """
    if scale == 1.0:
        yield
        return
    transform = getattr(model, "transform", None)
    if transform is None or not hasattr(transform, "min_size"):
        raise ValueError(f"--scales {scale:g} needs a model with an input resize (model.transform)")
    min_size, max_size = transform.min_size, transform.max_size
    transform.min_size = tuple(max(1, round(s * scale)) for s in min_size)
    transform.max_size = max(1, round(max_size * scale))
    try:
        yield
    finally:
        transform.min_size, transform.max_size = min_size, max_size


def tile_items(pred: dict[str, torch.Tensor], window: Window, scene_hw: tuple[int, int],
               label_to_category: list[int], options: TileOptions, source: int) -> list[SceneItem]:
    """One tile's detections above the score threshold as scene items.

    Args:
        pred: ``boxes float [N, 4]`` xyxy in tile pixels, ``labels int64 [N]`` in 1..K,
            ``scores float [N]``, ``roi_masks float [N, M, M]`` box-relative probabilities.
        window: the tile's ``(y1, y2, x1, x2)`` in the scene.
        scene_hw: ``(H, W)`` of the scene.
        label_to_category: ``[i]`` is the category id of label ``i + 1``.
        options: thresholds.
        source: the tile's id (items of one tile are never fused together).
    """
    y1, y2, x1, x2 = window
    keep = torch.nonzero(pred["scores"] >= options.score_threshold).flatten()
    boxes, labels, scores = pred["boxes"][keep], pred["labels"][keep].tolist(), pred["scores"][keep].tolist()
    items = []
    for (local, x0, y0), box, label, score in zip(
            iter_windows(pred["roi_masks"][keep], boxes, (y2 - y1, x2 - x1)), boxes.tolist(), labels, scores):
        mask = (local > options.mask_threshold).numpy()
        bbox = [box[0] + x1, box[1] + y1, box[2] - box[0], box[3] - box[1]]
        item = make_item(mask, x1 + x0, y1 + y0, scene_hw, source=source, category_id=label_to_category[label - 1],
                         score=score, window=(x1, y1, x2 - x1, y2 - y1), bbox=bbox)
        if item is not None:
            items.append(item)
    return items
