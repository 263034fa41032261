"""Compact instance masks: memory that grows with the objects, not with image area x count.

:class:`InstanceMasks` holds the masks of one image, each instance as either

* a bitmap cropped to the instance (``uint8 [h, w]`` at offset ``x0, y0``), for RLE or raster sources
  (holes, crowd regions); or
* polygons (``float64 [P, 2]`` rings of ``x, y`` pixel-edge coordinates: pixel ``(row r, col c)``
  covers ``[c, c + 1) x [r, r + 1)``), the COCO polygon form, together with their raster cropped
  to the instance.

Flips, 90-degree rotations and crops move the small crops pixel-exactly (and the polygon
geometry with them), so they give exactly what the same operation on full-size masks gives.
Rescaling scales the geometry and rasterises it again, which is sharper than resampling a
raster. Boxes and areas come from the crops, so they equal what the full-size masks would give. :meth:`InstanceMasks.crop_and_resize` rasterises an instance only inside a given
RoI, which is what Mask R-CNN's mask loss needs; full-size ``[N, H, W]`` masks are made only by
:meth:`InstanceMasks.to_full`, on request.

Polygons are rasterised with pycocotools, as COCO and the evaluation do; rasterising in a window
shifted by whole pixels gives exactly the window of the full-size raster.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import roi_align

from rsiseg.structures import rle_to_window, rle_to_xywh, window_to_rle

Window = tuple[int, int, int, int]  # (x0, y0, x1, y1), end-exclusive pixels


@dataclass(frozen=True)
class Bitmap:
    """One instance as a ``uint8 [h, w]`` {0, 1} crop whose top-left pixel is ``(x0, y0)``."""

    mask: np.ndarray
    x0: int
    y0: int


@dataclass(frozen=True)
class Polygons:
    """One instance as polygon rings (a union, as COCO multi-part polygons) and their tight raster."""

    rings: tuple[np.ndarray, ...]  # each float64 [P, 2], x then y
    raster: Bitmap


Instance = Polygons | Bitmap
_EMPTY = Bitmap(np.zeros((0, 0), np.uint8), 0, 0)


def hflip_xy(xy: np.ndarray, width: float) -> np.ndarray:
    """``float [N, 2]`` (x, y) points of a ``width`` px wide image mirrored left-right, as ``image[:, ::-1]``."""
    return np.stack([width - xy[:, 0], xy[:, 1]], 1)


def vflip_xy(xy: np.ndarray, height: float) -> np.ndarray:
    """``float [N, 2]`` (x, y) points of a ``height`` px high image mirrored top-bottom, as ``image[::-1]``."""
    return np.stack([xy[:, 0], height - xy[:, 1]], 1)


def rot90_xy(xy: np.ndarray, width: float) -> np.ndarray:
    """``float [N, 2]`` (x, y) points of a ``width`` px wide image after one ``np.rot90`` (a counter-clockwise
    quarter turn: the new image is ``width`` px high)."""
    return np.stack([xy[:, 1], width - xy[:, 0]], 1)


class InstanceMasks:
    """The instance masks of one ``H x W`` image, stored compactly.

    Every operation returns a new object and never mutates instances. ``len()`` is N; indexing with an int list, an index or bool
    tensor, or a slice selects instances.

    Args:
        instances: N :class:`Polygons` or :class:`Bitmap` items.
        height, width: the image size H, W.
    """

    def __init__(self, instances: Sequence[Instance], height: int, width: int) -> None:
        self.instances = list(instances)
        self.height, self.width = int(height), int(width)

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_coco(cls, segmentations: Sequence[Any], height: int, width: int) -> InstanceMasks:
        """From COCO segmentations: polygon lists, or RLE dicts (compressed or not).

        An RLE becomes a bitmap cropped to its box without decoding the full image.
        """
        instances: list[Instance] = []
        for segm in segmentations:
            if isinstance(segm, list):
                rings = tuple(np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in segm if len(p) >= 6)
                instances.append(_polygons(rings, height, width) if rings else _EMPTY)
            else:
                rle = segm
                if [int(v) for v in segm.get("size", ())] != [height, width]:
                    raise ValueError(f"RLE size {segm.get('size')} is not the image size [{height}, {width}]")
                if isinstance(segm.get("counts"), list):
                    rle = mask_utils.frPyObjects(segm, height, width)
                x, y, w, h = (int(round(v)) for v in rle_to_xywh(rle))
                instances.append(Bitmap(rle_to_window(rle, x, y, x + w, y + h), x, y) if w and h else _EMPTY)
        return cls(instances, height, width)

    @classmethod
    def from_masks(cls, masks: np.ndarray | torch.Tensor) -> InstanceMasks:
        """From full-size ``[N, H, W]`` binary masks (each is cropped to its pixels)."""
        masks = masks.numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
        return cls([_tight(Bitmap(m.astype(np.uint8), 0, 0)) for m in masks], masks.shape[1], masks.shape[2])

    @classmethod
    def from_boxes(cls, boxes: np.ndarray | torch.Tensor, height: int, width: int) -> InstanceMasks:
        """Filled boxes (``[N, 4]`` xyxy pixels) as masks, e.g. for box-only annotations."""
        instances = []
        for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
            x0, y0 = max(int(math.floor(x1)), 0), max(int(math.floor(y1)), 0)
            xe, ye = min(max(int(math.ceil(x2)), x0 + 1), width), min(max(int(math.ceil(y2)), y0 + 1), height)
            instances.append(Bitmap(np.ones((ye - y0, xe - x0), np.uint8), x0, y0) if xe > x0 and ye > y0 else _EMPTY)
        return cls(instances, height, width)

    # ----------------------------------------------------------------- container

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: Any) -> InstanceMasks:
        if isinstance(index, slice):
            picked = self.instances[index]
        else:
            idx = torch.as_tensor(index) if not isinstance(index, torch.Tensor) else index
            if idx.dtype == torch.bool:
                idx = torch.nonzero(idx).flatten()
            picked = [self.instances[i] for i in idx.reshape(-1).tolist()]
        return InstanceMasks(picked, self.height, self.width)

    def __repr__(self) -> str:
        polygons = sum(isinstance(i, Polygons) for i in self.instances)
        return f"InstanceMasks(n={len(self)}, size={self.height}x{self.width}, polygons={polygons})"

    @property
    def image_size(self) -> tuple[int, int]:
        return self.height, self.width

    def to(self, *args: Any, **kwargs: Any) -> InstanceMasks:
        """Stay on the CPU: masks are rasterised per RoI, and only those crops move to a device."""
        return self

    def nbytes(self) -> int:
        """Bytes held by the polygon rings and bitmap crops (the rasters cached for boxes excluded)."""
        return sum(sum(r.nbytes for r in i.rings) if isinstance(i, Polygons) else i.mask.nbytes
                   for i in self.instances)

    # ----------------------------------------------------------------- geometry

    def hflip(self) -> InstanceMasks:
        """Mirror left-right, as ``image[:, ::-1]``."""
        return self._map(lambda xy: hflip_xy(xy, self.width),
                         lambda b: Bitmap(b.mask[:, ::-1].copy(), self.width - b.x0 - b.mask.shape[1], b.y0),
                         self.height, self.width)

    def vflip(self) -> InstanceMasks:
        """Mirror top-bottom, as ``image[::-1]``."""
        return self._map(lambda xy: vflip_xy(xy, self.height),
                         lambda b: Bitmap(b.mask[::-1].copy(), b.x0, self.height - b.y0 - b.mask.shape[0]),
                         self.height, self.width)

    def rot90(self, k: int = 1) -> InstanceMasks:
        """Rotate by ``k`` quarter turns counter-clockwise, as ``np.rot90(image, k)``; H and W swap for odd k."""
        out = self
        for _ in range(k % 4):
            w = out.width
            out = out._map(lambda xy: rot90_xy(xy, w),
                           lambda b: Bitmap(np.rot90(b.mask).copy(), b.y0, w - b.x0 - b.mask.shape[1]),
                           out.width, out.height)
        return out

    def resize(self, height: int, width: int) -> InstanceMasks:
        """Rescale to an ``height x width`` image.

        Polygons scale exactly and are rasterised again. Bitmaps are resampled at pixel centres
        (nearest neighbour, as the same resampling of the full mask would) inside their box only.
        """
        sx, sy = width / self.width, height / self.height

        def scale_bitmap(b: Bitmap) -> Instance:
            h, w = b.mask.shape
            nx0, ny0 = int(math.floor(b.x0 * sx)), int(math.floor(b.y0 * sy))
            nx1, ny1 = min(int(math.ceil((b.x0 + w) * sx)), width), min(int(math.ceil((b.y0 + h) * sy)), height)
            src_x = np.floor((np.arange(nx0, nx1) + 0.5) / sx).astype(np.int64) - b.x0
            src_y = np.floor((np.arange(ny0, ny1) + 0.5) / sy).astype(np.int64) - b.y0
            ok_x, ok_y = (src_x >= 0) & (src_x < w), (src_y >= 0) & (src_y < h)
            out = np.zeros((len(src_y), len(src_x)), np.uint8)
            out[np.ix_(ok_y, ok_x)] = b.mask[np.ix_(src_y[ok_y], src_x[ok_x])]
            return _tight(Bitmap(out, nx0, ny0))

        def scale(item: Instance) -> Instance:
            if isinstance(item, Polygons):
                return _polygons(tuple(r * (sx, sy) for r in item.rings), height, width)
            return scale_bitmap(item) if item.mask.size else _EMPTY

        return InstanceMasks([scale(i) for i in self.instances], height, width)

    def crop(self, window: Window) -> InstanceMasks:
        """The part inside ``window = (x0, y0, x1, y1)``, in the window's coordinates.

        Polygon rings are shifted, not clipped (their raster is cropped; :meth:`to_coco` clips the
        geometry). Instances outside the window become empty.
        """
        x0, y0, x1, y1 = window
        if not (0 <= x0 < x1 <= self.width and 0 <= y0 < y1 <= self.height):
            raise ValueError(f"crop window {window} is not inside the {self.width}x{self.height} image")

        def crop_bitmap(b: Bitmap) -> Instance:
            h, w = b.mask.shape
            cx0, cy0, cx1, cy1 = max(x0, b.x0), max(y0, b.y0), min(x1, b.x0 + w), min(y1, b.y0 + h)
            if cx1 <= cx0 or cy1 <= cy0:
                return _EMPTY
            part = b.mask[cy0 - b.y0: cy1 - b.y0, cx0 - b.x0: cx1 - b.x0]
            return _tight(Bitmap(part.copy(), cx0 - x0, cy0 - y0))

        return self._map(lambda xy: xy - (x0, y0), crop_bitmap, y1 - y0, x1 - x0)

    # ----------------------------------------------------------------- rasters

    def local_mask(self, i: int) -> Bitmap:
        """Instance ``i`` as a bitmap cropped to its pixels (empty: a ``0 x 0`` bitmap)."""
        item = self.instances[i]
        return item.raster if isinstance(item, Polygons) else item

    def boxes(self) -> torch.Tensor:
        """Tight ``float32 [N, 4]`` xyxy pixel boxes (x2 = last column + 1); zeros for empty instances."""
        out = torch.zeros((len(self), 4), dtype=torch.float32)
        for i in range(len(self)):
            b = self.local_mask(i)
            if b.mask.size:
                out[i] = torch.tensor([b.x0, b.y0, b.x0 + b.mask.shape[1], b.y0 + b.mask.shape[0]])
        return out

    def areas(self) -> torch.Tensor:
        """Foreground pixel counts, ``int64 [N]``."""
        return torch.tensor([int(self.local_mask(i).mask.sum()) for i in range(len(self))], dtype=torch.int64)

    def window(self, i: int, window: Window) -> np.ndarray:
        """Instance ``i`` inside ``window = (x0, y0, x1, y1)`` (may exceed the image) as ``uint8 [y1-y0, x1-x0]``."""
        x0, y0, x1, y1 = window
        out = np.zeros((y1 - y0, x1 - x0), np.uint8)
        b = self.local_mask(i)
        h, w = b.mask.shape
        cx0, cy0, cx1, cy1 = max(x0, b.x0), max(y0, b.y0), min(x1, b.x0 + w), min(y1, b.y0 + h)
        if cx1 > cx0 and cy1 > cy0:
            out[cy0 - y0: cy1 - y0, cx0 - x0: cx1 - x0] = b.mask[cy0 - b.y0: cy1 - b.y0, cx0 - b.x0: cx1 - b.x0]
        return out

    def crop_and_resize(self, boxes: torch.Tensor, indices: torch.Tensor | Sequence[int], size: int) -> torch.Tensor:
        """Mask targets of RoIs: instance ``indices[k]`` sampled inside ``boxes[k]`` at ``size x size``.

        Equals ``roi_align(full_masks[indices, None].float(), boxes, size, 1.0)`` (torchvision's
        Mask R-CNN targets, ``aligned=False``), but each instance is rasterised only inside its RoI
        plus a 2-pixel margin, so the cost grows with the RoIs, not with the image.

        Args:
            boxes: ``[K, 4]`` xyxy RoIs in this image's pixels, any float dtype and device.
            indices: ``[K]`` instance index of each RoI.
            size: output side M.

        Returns:
            ``[K, M, M]`` float values in [0, 1], on ``boxes``' device and dtype.
        """
        indices = torch.as_tensor(indices).reshape(-1).tolist()
        out = torch.zeros((len(indices), size, size), dtype=torch.float32)
        rois = boxes.detach().to("cpu", torch.float32)
        for k, (i, roi) in enumerate(zip(indices, rois.tolist())):
            x0 = min(max(int(math.floor(roi[0])) - 2, 0), self.width - 1)
            y0 = min(max(int(math.floor(roi[1])) - 2, 0), self.height - 1)
            x1 = max(min(int(math.ceil(roi[2])) + 3, self.width), x0 + 1)
            y1 = max(min(int(math.ceil(roi[3])) + 3, self.height), y0 + 1)
            local = torch.from_numpy(self.window(i, (x0, y0, x1, y1))).float()[None, None]
            shifted = torch.tensor([[0.0, roi[0] - x0, roi[1] - y0, roi[2] - x0, roi[3] - y0]])
            out[k] = roi_align(local, shifted, (size, size), 1.0)[0, 0]
        return out.to(boxes.device, boxes.dtype if boxes.is_floating_point() else torch.float32)

    def to_full(self) -> torch.Tensor:
        """Full-size ``uint8 [N, H, W]`` masks: only for small images or when explicitly needed."""
        out = torch.zeros((len(self), self.height, self.width), dtype=torch.uint8)
        for i in range(len(self)):
            b = self.local_mask(i)
            h, w = b.mask.shape
            out[i, b.y0: b.y0 + h, b.x0: b.x0 + w] = torch.from_numpy(b.mask)
        return out

    def to_coco(self, i: int) -> list[list[float]] | dict[str, Any]:
        """COCO segmentation of instance ``i``: polygons clipped to the image, or a compressed RLE.

        Polygons whose clipped shape has holes (which COCO polygons cannot encode) become RLE.
        """
        item = self.instances[i]
        if isinstance(item, Polygons):
            polygons = _clip_polygons(item.rings, (0, 0, self.width, self.height))
            if polygons is not None:
                return polygons
        return self.to_rle(i)

    def to_rle(self, i: int) -> dict[str, Any]:
        """Instance ``i`` as a JSON-ready compressed RLE of the ``H x W`` image, made from its crop alone."""
        b = self.local_mask(i)
        return window_to_rle(b.mask, b.x0, b.y0, self.height, self.width)

    # ----------------------------------------------------------------- helpers

    def _map(self, points: Any, bitmap: Any, height: int, width: int) -> InstanceMasks:
        """Apply ``points`` (``[P, 2] -> [P, 2]``) to polygon rings and ``bitmap`` to every raster."""
        return InstanceMasks([_map_instance(i, points, bitmap) for i in self.instances], height, width)


def _map_instance(item: Instance, points: Any, bitmap: Any) -> Instance:
    if isinstance(item, Polygons):
        return Polygons(tuple(points(r) for r in item.rings), _map_instance(item.raster, points, bitmap))
    return bitmap(item) if item.mask.size else _EMPTY


def _polygons(rings: tuple[np.ndarray, ...], height: int, width: int) -> Polygons:
    """Polygon rings with their raster, made inside their whole-pixel bounding window (clipped to the image)."""
    points = np.concatenate(rings)
    if not np.isfinite(points).all():
        raise ValueError("polygon has non-finite coordinates")
    x0 = min(max(int(math.floor(points[:, 0].min())) - 1, 0), width)
    y0 = min(max(int(math.floor(points[:, 1].min())) - 1, 0), height)
    x1 = max(min(int(math.ceil(points[:, 0].max())) + 2, width), x0)
    y1 = max(min(int(math.ceil(points[:, 1].max())) + 2, height), y0)
    if x1 <= x0 or y1 <= y0:
        return Polygons(rings, _EMPTY)
    shifted = [(ring - (x0, y0)).ravel().tolist() for ring in rings]
    rle = mask_utils.merge(mask_utils.frPyObjects(shifted, y1 - y0, x1 - x0))
    return Polygons(rings, _tight(Bitmap(mask_utils.decode(rle), x0, y0)))


def _tight(b: Bitmap) -> Bitmap:
    """Shrink a bitmap to its foreground pixels."""
    if not b.mask.size:
        return _EMPTY
    rows, cols = np.flatnonzero(b.mask.any(1)), np.flatnonzero(b.mask.any(0))
    if not len(rows):
        return _EMPTY
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    if (r0, c0) == (0, 0) and (r1, c1) == b.mask.shape:
        return b
    return Bitmap(b.mask[r0:r1, c0:c1].copy(), b.x0 + int(c0), b.y0 + int(r0))


def _clip_polygons(rings: tuple[np.ndarray, ...], window: Window) -> list[list[float]] | None:
    """COCO polygons of the union of ``rings`` clipped to ``window``; None if it has holes or is empty.

    Self-intersecting rings are repaired with shapely's ``make_valid`` first.
    """
    import shapely  # imported here: only exporting polygons needs it
    from shapely.validation import make_valid

    shapes = [make_valid(shapely.Polygon(r)) for r in rings if len(r) >= 3]
    if not shapes:
        return None
    clipped = shapely.clip_by_rect(shapely.union_all(shapes), *window)
    parts = [g for g in shapely.get_parts(clipped) if isinstance(g, shapely.Polygon) and g.area > 0]
    if not parts or any(p.interiors for p in parts):
        return None
    return [[round(float(v), 2) for v in np.asarray(p.exterior.coords)[:-1].ravel()] for p in parts]
