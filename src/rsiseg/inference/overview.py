"""A downsampled picture of a whole scene with its instances outlined, for a first look at a run."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw
from shapely.geometry import MultiPolygon

from rsiseg.data.merge import SceneItem
from rsiseg.inference.display import to_display_rgb
from rsiseg.inference.raster import RasterScene
from rsiseg.inference.visualize import class_colors


def draw_overview(scene: RasterScene, polygons: list[MultiPolygon | None], items: list[SceneItem],
                  category_ids: list[int], max_side: int = 2048) -> Image.Image:
    """The scene read decimated to ``max_side`` px with each instance's outline in its class colour.

    Args:
        scene: the open raster.
        polygons: each item's outline in scene pixels (None: drawn as its box).
        items: the merged detections, aligned with ``polygons``.
        category_ids: the model's categories in label order (they pick the colours).
        max_side: longer side of the picture in pixels.
    """
    pixels, scale = scene.overview(max_side)
    canvas = Image.fromarray(to_display_rgb(pixels))
    draw = ImageDraw.Draw(canvas)
    colors = dict(zip(category_ids, class_colors(len(category_ids))))
    width = max(1, round(max_side / 1024))
    for polygon, item in zip(polygons, items):
        color = colors.get(item.category_id, (255, 255, 255))
        rings = [] if polygon is None else [p.exterior.coords for p in polygon.geoms]
        for ring in rings:
            draw.line([(x * scale, y * scale) for x, y in ring], fill=color, width=width)
        if not rings:
            x, y, w, h = item.box
            draw.rectangle([x * scale, y * scale, (x + w) * scale, (y + h) * scale], outline=color, width=width)
    return canvas


def save_overview(path: Path, image: Image.Image) -> None:
    """Write the overview PNG (the caller stages it for atomicity)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
