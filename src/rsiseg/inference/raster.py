"""Windowed reading of scenes of any size (PNG, JPEG, TIFF, GeoTIFF) through rasterio.

A scene is never loaded whole: tiles are read one window at a time, with the bands a user picked,
through a bounded GDAL block cache, and GDAL's mask band (nodata value, alpha band or internal mask)
tells which pixels are valid.
Errors name the file and what is wrong with it, instead of surfacing as GDAL tracebacks.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window as RioWindow

from rsiseg.data.io import ImageReadError

Window = tuple[int, int, int, int]  # (y1, y2, x1, x2), end-exclusive, as data.tiling.patch_windows
# GDAL's block cache while a scene is open, in MB. Its default (5% of the RAM) keeps every block a
# tiled pass decodes, so memory followed the scene's area (+150 MB from 4096² to 8192² px, measured).
# Tiles go row by row, so the blocks worth keeping are those of the current tile row and its overlap.
BLOCK_CACHE_MB = 64


class RasterScene:
    """An open raster read window by window.

    While it is open, GDAL's block cache is held at ``BLOCK_CACHE_MB`` (a ``rasterio.Env``, left by
    :meth:`close`). Those environments stack, so scenes open at the same time must close in the reverse
    order, as nested ``with`` blocks do.

    Attributes:
        path: the file.
        height, width: scene size in pixels.
        bands: the 1-based band indexes read, in output order.
        crs: the raster's CRS, or None when it has none (outputs are then in pixel coordinates).
        transform: affine pixel -> CRS transform (identity without georeferencing).
    """

    def __init__(self, path: str | Path, bands: Sequence[int] | None = None, model_bands: int = 3) -> None:
        """Open ``path``; ``bands`` are 1-based (default: the first ``model_bands``, or all when fewer)."""
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"scene not found: {self.path}")
        self._env = rasterio.Env(GDAL_CACHEMAX=BLOCK_CACHE_MB)  # exited by close()
        self._env.__enter__()
        try:
            self._dataset = _open(self.path)
        except RasterioError as err:
            self._env.__exit__(None, None, None)
            raise ImageReadError(f"{self.path}: not a readable raster ({err})") from None
        ds = self._dataset
        self.height, self.width = int(ds.height), int(ds.width)
        if self.height == 0 or self.width == 0:
            self.close()
            raise ImageReadError(f"{self.path}: the raster is empty ({self.width} x {self.height} px)")
        self.bands = self._check_bands(bands, ds.count, model_bands)
        self.crs = ds.crs if ds.crs else None
        self.transform = ds.transform
        self.dtype = np.dtype(ds.dtypes[self.bands[0] - 1])

    def _check_bands(self, bands: Sequence[int] | None, count: int, model_bands: int) -> list[int]:
        if bands is None:  # an RGB scene into a 1-band model is averaged to grey by match_bands
            return list(range(1, (3 if count == 3 else min(count, model_bands)) + 1))
        bad = [b for b in bands if not 1 <= b <= count]
        if bad:
            self.close()
            raise ValueError(f"{self.path}: --bands {','.join(map(str, bands))} asks for band(s) {bad}, but the "
                             f"raster has bands 1..{count}")
        return list(bands)

    def __enter__(self) -> RasterScene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file and restore GDAL's block cache size."""
        if not self._dataset.closed:
            self._dataset.close()
            self._env.__exit__(None, None, None)

    @property
    def georeferenced(self) -> bool:
        """Whether the raster has a CRS (otherwise outputs are written in pixel coordinates)."""
        return self.crs is not None

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Pixels and validity of one window.

        Args:
            window: ``(y1, y2, x1, x2)`` inside the scene.

        Returns:
            ``(pixels, valid)``: ``[h, w, C]`` in the raster's dtype, C = ``len(bands)``, with
            invalid pixels set to 0; and ``bool [h, w]``, False where GDAL's mask marks nodata.

        Raises:
            ImageReadError: the pixels cannot be decoded (a corrupt or truncated file), naming the window.
        """
        y1, y2, x1, x2 = window
        rio_window = RioWindow(x1, y1, x2 - x1, y2 - y1)
        try:
            pixels = self._dataset.read(self.bands, window=rio_window)
            valid = self._dataset.read_masks(self.bands[0], window=rio_window) > 0
        except RasterioError as err:
            raise ImageReadError(f"{self.path}: cannot read window x {x1}..{x2}, y {y1}..{y2} ({err}); "
                                 "the file may be truncated or corrupt") from None
        pixels = np.moveaxis(pixels, 0, -1)
        if not valid.all():
            pixels = np.where(valid[..., None], pixels, 0).astype(pixels.dtype)
        return pixels, valid

    def overview(self, max_side: int) -> tuple[np.ndarray, float]:
        """The whole scene read decimated so that its longer side is at most ``max_side``.

        Returns:
            ``([h, w, C] pixels, scale)`` with ``scale = h / height`` (<= 1). GDAL reads from the
            file's overviews when it has them, so memory follows the output size.
        """
        scale = min(1.0, max_side / max(self.height, self.width))
        shape = (len(self.bands), max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        try:
            pixels = self._dataset.read(self.bands, out_shape=shape)
        except RasterioError as err:
            raise ImageReadError(f"{self.path}: cannot read an overview ({err})") from None
        return np.moveaxis(pixels, 0, -1), shape[1] / self.height

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts about the scene: size, bands, dtype, CRS and transform."""
        return {"file_name": str(self.path), "height": self.height, "width": self.width, "bands": self.bands,
                "dtype": str(self.dtype), "crs": self.crs.to_string() if self.crs else None,
                "transform": list(self.transform)[:6]}


def scene_size(path: str | Path) -> tuple[int, int] | None:
    """``(H, W)`` of a raster from its header, or None when rasterio cannot open it."""
    try:
        with _open(path) as ds:
            return int(ds.height), int(ds.width)
    except RasterioError:
        return None


def _open(path: str | Path) -> rasterio.io.DatasetReader:
    """``rasterio.open`` without the warning for rasters that have no georeferencing (reported by the caller)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)
