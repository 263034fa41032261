"""One scene's outputs written as its instances come out of the tiled pass, never all held at once.

:class:`SceneOutputs` takes each batch of final instances from
:func:`~rsiseg.inference.tiled.stream_scene` and

* appends their COCO results (RLE in scene pixels) to a JSON-lines part file, joined into
  ``predictions.json`` when every scene is done (:func:`join_scene_results`);
* writes their polygons in the raster's CRS (:class:`~rsiseg.inference.geo_export.VectorWriter`);
* outlines them on the scene's overview picture;
* counts them per class.

So besides the merge's undecided detections (:func:`~rsiseg.inference.tiled.stream_scene`), memory
holds the overview picture (at most ``overview_size`` px square) and one batch of instances, whatever
the scene's size.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from rsiseg.data.merge import SceneItem
from rsiseg.fileio import atomic_write
from rsiseg.inference.geo_export import VECTOR_DRIVERS, VectorWriter, item_polygon
from rsiseg.inference.overview import OverviewCanvas, save_overview
from rsiseg.inference.raster import RasterScene

PARTS_FOLDER = ".result_parts"


class SceneOutputs:
    """The files of one scene in ``staging``: result part, vectors, overview; and its counts per class.

    Use as a context manager: ``add`` each batch, then ``finish``.

    Args:
        scene: the open raster.
        index: the scene's position in the run (names its result part: image ids may repeat).
        image_id: the scene's id in the results.
        stem: file stem of its vectors and overview.
        staging: the run's staging folder.
        names: class name of each category id.
        category_ids: the model's categories in label order (the overview's colours).
        vector_format: ``geojson``, ``gpkg`` or ``none``.
        simplify: polygon simplification tolerance in pixels.
        overview_size: the overview's longer side in pixels; 0 writes none.
    """

    def __init__(self, scene: RasterScene, index: int, image_id: int, stem: str, staging: Path, names: dict[int, str],
                 category_ids: list[int], *, vector_format: str, simplify: float, overview_size: int) -> None:
        self.image_id, self.staging, self.names, self.simplify = image_id, staging, names, simplify
        self.counts: Counter[int] = Counter()
        self.entry: dict[str, Any] = {}
        self.vectors = self.overview = None
        if vector_format != "none":
            driver, suffix = VECTOR_DRIVERS[vector_format]
            self.entry["vectors"] = f"vectors/{stem}{suffix}"
            (staging / "vectors").mkdir(exist_ok=True)
            self.vectors = VectorWriter(staging / self.entry["vectors"], names, scene.transform, scene.crs, driver)
        if overview_size > 0:
            self.entry["overview"] = f"overviews/{stem}.png"
            self.overview = OverviewCanvas(scene, category_ids, overview_size)
        part = result_part(staging, index)
        part.parent.mkdir(exist_ok=True)
        self.results = part.open("w", encoding="utf-8")

    def add(self, items: list[SceneItem]) -> None:
        """Write one batch of final instances."""
        self.results.writelines(json.dumps(item.to_result(self.image_id)) + "\n" for item in items)
        self.counts.update(item.category_id for item in items)
        if self.vectors is None and self.overview is None:
            return
        polygons = [item_polygon(item, self.simplify) for item in items]
        if self.vectors is not None:
            self.vectors.write(polygons, items)
        if self.overview is not None:
            self.overview.draw(polygons, items)

    def __enter__(self) -> SceneOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.results.close()  # after an error the caller discards the staging folder

    def finish(self) -> dict[str, Any]:
        """Finish the files; returns the scene's images.json fields: ``counts``, ``vectors``, ``features``, ``overview``."""
        self.results.close()
        if self.vectors is not None:
            self.entry["features"] = self.vectors.close()
        if self.overview is not None:
            save_overview(self.staging / self.entry["overview"], self.overview.image)
        return {**self.entry, "counts": {self.names.get(c, str(c)): self.counts[c] for c in sorted(self.counts)}}


def result_part(staging: Path, index: int) -> Path:
    """The JSON-lines file of the COCO results of the run's ``index``-th scene inside ``staging``."""
    return staging / PARTS_FOLDER / f"{index}.jsonl"


def join_scene_results(staging: Path, indices: list[int]) -> int:
    """Join the result parts of the scenes at ``indices`` (positions in the run), in that order, into
    ``staging/predictions.json``.

    The parts are removed afterwards. Returns the number of results.
    """
    count = join_result_parts([result_part(staging, i) for i in indices], staging / "predictions.json")
    shutil.rmtree(staging / PARTS_FOLDER, ignore_errors=True)  # absent when no scene ran
    return count


def join_result_parts(parts: list[Path], path: Path) -> int:
    """Stream the result part files, in order, into one COCO results JSON list at ``path`` (atomic).

    Returns:
        The number of results.
    """
    count = 0

    def write(handle: Any) -> None:
        nonlocal count
        handle.write("[")
        for part in parts:
            with part.open(encoding="utf-8") as lines:
                for line in lines:
                    handle.write(("," if count else "") + line.rstrip("\n"))
                    count += 1
        handle.write("]")

    atomic_write(path, write)
    return count
