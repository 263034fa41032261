"""Instances as polygons: GeoJSON or GeoPackage in the raster's CRS, through GDAL (pyogrio).

Each merged instance becomes one valid (Multi)Polygon: the pixel edges of its cropped mask
(``rasterio.features.shapes``), simplified within a tolerance in pixels, repaired with shapely's
``make_valid`` and mapped to the CRS by the raster's affine transform. A raster without a CRS
gets pixel coordinates (x right, y down) and no CRS in the file.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio
import pyogrio.raw
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import shapes
from shapely.affinity import affine_transform
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.geometry.base import BaseGeometry
from shapely.validation import make_valid

from rsiseg.data.merge import SceneItem

VECTOR_DRIVERS = {"geojson": ("GeoJSON", ".geojson"), "gpkg": ("GPKG", ".gpkg")}


def item_polygon(item: SceneItem, simplify_px: float = 0.0) -> MultiPolygon | None:
    """The mask of ``item`` as a valid MultiPolygon in scene pixel coordinates; None if nothing is left.

    Args:
        item: a merged detection (its ``crop`` at ``(x, y)``).
        simplify_px: Douglas-Peucker tolerance in pixels (0 keeps the pixel-edge outline).
    """
    crop = item.crop
    pieces = [shape(geom) for geom, _ in shapes(crop.astype(np.uint8), mask=crop,
                                                 transform=Affine.translation(item.x, item.y))]
    geom: BaseGeometry = shapely.union_all(pieces)
    if simplify_px > 0:
        geom = geom.simplify(simplify_px, preserve_topology=True)
    return _polygonal(make_valid(geom))


def _polygonal(geom: BaseGeometry) -> MultiPolygon | None:
    """The polygons of a geometry (``make_valid`` may return lines next to them) as one MultiPolygon."""
    parts = [g for g in getattr(geom, "geoms", [geom]) if isinstance(g, (Polygon, MultiPolygon)) and not g.is_empty]
    polygons = [p for g in parts for p in getattr(g, "geoms", [g])]
    return MultiPolygon(polygons) if polygons else None


def to_map(geom: BaseGeometry, transform: Affine) -> BaseGeometry:
    """Pixel coordinates -> CRS coordinates by the raster's affine transform."""
    return affine_transform(geom, [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f])


def area_m2(geom: BaseGeometry, crs: CRS | None) -> float | None:
    """Area of a CRS geometry in square metres; None when the CRS is missing or not projected."""
    if crs is None or not crs.is_projected:
        return None
    _, metres_per_unit = crs.linear_units_factor
    return float(geom.area) * metres_per_unit**2


def write_vectors(path: str | Path, polygons: list[MultiPolygon], items: list[SceneItem], names: dict[int, str],
                  transform: Affine, crs: CRS | None, driver: str, *, first_id: int = 1, append: bool = False,
                  layer: str | None = None) -> int:
    """Write one feature per instance; returns the number written.

    Args:
        path: output file (``.geojson`` or ``.gpkg``); the caller makes it atomic.
        polygons: ``item_polygon`` of each item, in scene pixels.
        items: the detections, aligned with ``polygons``.
        names: class name of each category id.
        transform: the raster's pixel -> CRS affine transform.
        crs: the raster's CRS, or None: then the polygons stay in pixel coordinates, whatever the
            transform says (it maps to no known coordinate system).
        driver: ``GeoJSON`` or ``GPKG``.
        first_id: the ``id`` of the first feature (the next ones count up).
        append: add to the layer of an existing file (cheap for GPKG; a GeoJSON append costs time that grows
            with the file: 2.5 s per 1,000 features at 60,000, measured).
        layer: layer name; default the file's stem.

    Fields: ``id`` (1-based), ``class``, ``category_id``, ``score``, ``area_px`` and ``area_m2``
    (null where the CRS is not projected).
    """
    geoms = [to_map(p, transform) for p in polygons] if crs is not None else list(polygons)
    fields: dict[str, Any] = {
        "id": np.arange(first_id, first_id + len(items), dtype=np.int64),
        "class": np.array([names.get(it.category_id, str(it.category_id)) for it in items], dtype=object),
        "category_id": np.array([it.category_id for it in items], dtype=np.int64),
        "score": np.array([it.score for it in items], dtype=np.float64),
        "area_px": np.array([it.area for it in items], dtype=np.float64),
        "area_m2": np.array([np.nan if (a := area_m2(g, crs)) is None else a for g in geoms], dtype=np.float64),
    }
    with _no_crs_warning():
        pyogrio.raw.write(str(path), np.array([shapely.to_wkb(g) for g in geoms], dtype=object),
                          list(fields.values()), list(fields), driver=driver, geometry_type="MultiPolygon",
                          crs=crs.to_wkt() if crs else None, nan_as_null=True, layer=layer or Path(path).stem,
                          append=append)
    return len(geoms)


class VectorWriter:
    """One scene's instances written batch by batch, never all in memory.

    The batches are appended to a GeoPackage (an append costs the batch only). For GeoJSON, whose
    appends cost time growing with the file, that GeoPackage is a staging file beside ``path``,
    streamed into the GeoJSON by GDAL when the scene is done and then removed.

    Args:
        path: the output file (``.geojson`` or ``.gpkg``), in a staging folder of the caller.
        names, transform, crs: as :func:`write_vectors` takes them.
        driver: ``GeoJSON`` or ``GPKG``.
    """

    def __init__(self, path: Path, names: dict[int, str], transform: Affine, crs: CRS | None, driver: str) -> None:
        if driver != "GPKG" and pyogrio.__gdal_version__ < (3, 8, 0):  # checked before any tile is predicted
            raise RuntimeError(f"writing {path.name} needs GDAL >= 3.8 (pyogrio's write_arrow); this pyogrio has "
                               f"GDAL {pyogrio.__gdal_version_string__}: upgrade pyogrio or pass --vector-format gpkg")
        self.path, self.names, self.transform, self.crs, self.driver = path, names, transform, crs, driver
        self.batches_path = path if driver == "GPKG" else path.with_name(f"{path.stem}.part.gpkg")
        self.count = 0

    def write(self, polygons: list[MultiPolygon | None], items: list[SceneItem]) -> None:
        """Add the items with a polygon (``item_polygon`` gives None for a mask with no area left)."""
        drawn = [(p, it) for p, it in zip(polygons, items) if p is not None]
        if not drawn:
            return
        self.count += write_vectors(self.batches_path, [p for p, _ in drawn], [it for _, it in drawn], self.names,
                                    self.transform, self.crs, "GPKG", first_id=self.count + 1,
                                    append=self.count > 0, layer=self.path.stem)

    def close(self) -> int:
        """Finish the file; returns the number of features."""
        if self.count == 0:
            return write_vectors(self.path, [], [], self.names, self.transform, self.crs, self.driver)
        if self.batches_path != self.path:
            with pyogrio.raw.open_arrow(self.batches_path, use_pyarrow=False) as (meta, stream), _no_crs_warning():
                pyogrio.raw.write_arrow(stream, str(self.path), layer=self.path.stem, driver=self.driver,
                                        geometry_name=meta["geometry_name"], geometry_type="MultiPolygon",
                                        crs=meta["crs"])
            self.batches_path.unlink()
        return self.count


@contextlib.contextmanager
def _no_crs_warning() -> Iterator[None]:
    """Silence GDAL's missing-CRS warning: the caller warns about a raster without CRS once, by file name."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'crs' was not provided")
        yield
