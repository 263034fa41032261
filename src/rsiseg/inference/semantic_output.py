"""Semantic segmentation outputs: class-index masks (PNG, or GeoTIFF on the input's grid),
colour renderings and the four-panel results figure (input, ground truth, points, prediction).

Every file is written atomically (see :mod:`rsiseg.fileio`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFont

from rsiseg.data.converters.potsdam import POTSDAM_CLASSES, POTSDAM_PALETTE, index_to_rgb
from rsiseg.fileio import atomic_write
from rsiseg.inference.visualize import class_colors

# GeoTIFF tags that place a raster on the ground: pixel scale, tie points, transformation, and
# the GeoKey directory with its double and ASCII parameters.
GEO_TAGS = (33550, 33922, 34264, 34735, 34736, 34737)
_PLACEMENT_TAGS = (33922, 34264, 34735)
Palette = Sequence[Sequence[int]]


def palette_for(class_names: Sequence[str], palette: Palette | None = None) -> list[tuple[int, int, int]]:
    """One RGB colour per class: ``palette`` (e.g. from ``classes.json``) when given, the ISPRS colours
    for the Potsdam classes, else distinct generated colours.

    Raises:
        ValueError: ``palette`` has fewer colours than classes, or a colour that is not three values in 0..255.
    """
    if palette is None:
        if tuple(class_names) == POTSDAM_CLASSES:
            return [tuple(c) for c in POTSDAM_PALETTE]
        return class_colors(len(class_names))
    colours = [tuple(c) for c in palette] if all(isinstance(c, (list, tuple)) for c in palette) else []
    if len(colours) < len(class_names) or not all(len(c) == 3 and all(
            isinstance(v, int) and 0 <= v <= 255 for v in c) for c in colours):
        raise ValueError(f"palette must give an RGB colour (three integers 0..255) for each of the "
                         f"{len(class_names)} classes, got {list(palette)[:3]}...")
    return colours[: len(class_names)]


def colorize(index: np.ndarray, palette: Palette) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of class indices ``[H, W]`` in ``palette`` colours; other values (ignore) are black."""
    return index_to_rgb(np.asarray(index), palette)


def is_georeferenced(path: str | Path) -> bool:
    """True for a TIFF carrying GeoTIFF placement tags (tie points, a transformation or GeoKeys)."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff") or not path.is_file():
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            return any(code in tif.pages[0].tags for code in _PLACEMENT_TAGS)
    except (OSError, ValueError, tifffile.TiffFileError):
        return False


def write_index_mask(path: str | Path, index: np.ndarray, georef_from: str | Path | None = None) -> Path:
    """Write a uint8 ``[H, W]`` class-index mask.

    Args:
        path: output file; a PNG, or a GeoTIFF when ``georef_from`` is georeferenced (its suffix
            is then ``.tif``, whatever ``path`` says).
        index: uint8 ``[H, W]`` class indices.
        georef_from: the input image; when it is a GeoTIFF, its geo tags are copied, and the mask
            must have its size (the output grid is the input's).

    Returns:
        The path written.
    """
    index = np.ascontiguousarray(index, dtype=np.uint8)
    if index.ndim != 2:
        raise ValueError(f"expected an index mask [H, W], got shape {index.shape}")
    path = Path(path)
    if georef_from is not None and is_georeferenced(georef_from):
        tags = _geo_tags(Path(georef_from), index.shape)
        path = path.with_suffix(".tif")
        buffer = io.BytesIO()  # tifffile wants a named file or a buffer, not atomic_write's descriptor
        tifffile.imwrite(buffer, index, extratags=tags, compression="zlib")
        return atomic_write(path, lambda handle: handle.write(buffer.getvalue()), binary=True)
    ok, png = cv2.imencode(".png", index)
    if not ok:
        raise OSError(f"{path}: could not encode the mask as PNG")
    return atomic_write(path.with_suffix(".png"), lambda handle: handle.write(png.tobytes()), binary=True)


def _geo_tags(source: Path, shape: tuple[int, int]) -> list[tuple]:
    """The ``extratags`` of tifffile that copy ``source``'s geo tags; checks the grid sizes agree."""
    with tifffile.TiffFile(source) as tif:
        page = tif.pages[0]
        if tuple(page.shape[:2]) != shape and not (len(page.shape) == 3 and tuple(page.shape[1:]) == shape):
            raise ValueError(f"mask of size {shape} does not match the grid of {source} ({page.shape})")
        tags = []
        for code in GEO_TAGS:
            tag = page.tags.get(code)
            if tag is not None:
                count = None if isinstance(tag.value, str) else tag.count
                tags.append((code, tag.dtype, count, tag.value, True))
    return tags


def results_figure(path: str | Path, image: np.ndarray, gt: np.ndarray, points: np.ndarray, pred: np.ndarray,
                   palette: Palette, class_names: Sequence[str]) -> Path:
    """Write one PNG with four panels, input / ground truth / labelled points / prediction, and a legend.

    Args:
        path: output PNG.
        image: uint8 ``[H, W, 3]`` display image.
        gt: ``[H, W]`` dense ground-truth class indices (ignore shows black).
        points: int ``[P, 2]`` ``(row, col)`` labelled points, drawn in their ground-truth class colour.
        pred: ``[H, W]`` predicted class indices.
        palette: one RGB colour per class.
        class_names: one name per class, for the legend.
    """
    height, width = gt.shape
    side = max(height, width)
    scale = min(min(max(side, 256), 768) / side, 8.0)  # panels of 256-768 px: small tiles grow, scenes shrink
    size = (max(1, round(width * scale)), max(1, round(height * scale)))

    def grow(panel: np.ndarray, labels: bool) -> np.ndarray:
        return cv2.resize(panel, size, interpolation=cv2.INTER_NEAREST if labels else cv2.INTER_AREA)

    shown = grow(np.ascontiguousarray(image[..., :3], dtype=np.uint8), labels=scale < 1)
    on_points = Image.fromarray((shown * 0.6).astype(np.uint8))
    draw = ImageDraw.Draw(on_points)
    radius = max(0.5, scale / 2)
    colours = colorize(gt[points[:, 0], points[:, 1]], palette) if len(points) else np.zeros((0, 3), np.uint8)
    for (row, col), colour in zip(points, colours):
        x, y = (col + 0.5) * scale, (row + 0.5) * scale
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=tuple(int(c) for c in colour))
    panels = [("input", shown), ("ground truth", grow(colorize(gt, palette), True)),
              (f"points ({len(points)})", np.asarray(on_points)), ("prediction", grow(colorize(pred, palette), True))]
    figure = _layout(panels, palette, class_names)
    buffer = io.BytesIO()
    figure.save(buffer, format="PNG")
    return atomic_write(path, lambda handle: handle.write(buffer.getvalue()), binary=True)


def _layout(panels: list[tuple[str, np.ndarray]], palette: Palette, class_names: Sequence[str]) -> Image.Image:
    """Panels side by side under their titles, with a one-row legend of the class colours below."""
    font = _font(14)
    pad, title_h, swatch = 8, 20, 12
    panel_h, panel_w = panels[0][1].shape[:2]
    legend = [(name, tuple(int(c) for c in palette[i])) for i, name in enumerate(class_names) if i < len(palette)]
    canvas = Image.new("RGB", (pad + len(panels) * (panel_w + pad), title_h + panel_h + 2 * pad + 2 * title_h),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (title, array) in enumerate(panels):
        x = pad + i * (panel_w + pad)
        draw.text((x, pad // 2), title, font=font, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(np.ascontiguousarray(array)), (x, title_h))
    x, y = pad, title_h + panel_h + pad
    for name, colour in legend:
        draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=colour, outline=(0, 0, 0))
        draw.text((x + swatch + 4, y), name, font=font, fill=(0, 0, 0))
        x += swatch + 12 + int(draw.textlength(name, font=font))
        if x > canvas.width - 100:  # wrap onto the second legend row
            x, y = pad, y + title_h
    return canvas


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()
