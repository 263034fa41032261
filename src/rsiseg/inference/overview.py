"""A downsampled picture of a whole scene with its instances outlined, for a first look at a run."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw
from shapely.geometry import MultiPolygon

from rsiseg.data.merge import SceneItem
from rsiseg.inference.display import to_display_rgb
from rsiseg.inference.raster import RasterScene
from rsiseg.inference.visualize import class_colors


class OverviewCanvas:
    """The scene read decimated to ``max_side`` px, on which instances are outlined batch by batch.

    Args:
        scene: the open raster.
        category_ids: the model's categories in label order (they pick the colours).
        max_side: longer side of the picture in pixels.
    """

    def __init__(self, scene: RasterScene, category_ids: list[int], max_side: int = 2048) -> None:
        pixels, self.scale = scene.overview(max_side)
        self.image = Image.fromarray(to_display_rgb(pixels))
        self._draw = ImageDraw.Draw(self.image)
        self.colors = dict(zip(category_ids, class_colors(len(category_ids))))
        self.line_width = max(1, round(max_side / 1024))

    def draw(self, polygons: list[MultiPolygon | None], items: list[SceneItem]) -> None:
        """Outline each item in its class colour.

        Args:
            polygons: each item's outline in scene pixels (None: drawn as its box).
            items: the merged detections, aligned with ``polygons``.
        """
        scale, width = self.scale, self.line_width
        for polygon, item in zip(polygons, items):
            color = self.colors.get(item.category_id, (255, 255, 255))
            rings = [] if polygon is None else [p.exterior.coords for p in polygon.geoms]
            for ring in rings:
                self._draw.line([(x * scale, y * scale) for x, y in ring], fill=color, width=width)
            if not rings:
                x, y, w, h = item.box
                self._draw.rectangle([x * scale, y * scale, (x + w) * scale, (y + h) * scale], outline=color,
                                     width=width)


def save_overview(path: Path, image: Image.Image) -> None:
    """Write the overview PNG (the caller stages it for atomicity)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
