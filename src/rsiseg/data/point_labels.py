"""Images and a point file, no masks: the training data of the point-only prompted modes.

A user with one click per object has a points JSON (``rsiseg data points`` writes one from COCO),
a CSV ``image,x,y,class`` or GeoJSON ``Point`` features (see :mod:`rsiseg.data.instance_points`),
and a folder of images. ``data.train_points`` names the file and ``data.train_images`` the folder;
the ``self_training`` and ``pointsam`` modes of PointSAM then train from the points alone (the
``supervised`` mode needs masks, so the config refuses it). Validation, where masks exist, stays a
COCO file (``data.val_ann``): the masks score the answers and are never trained on.

The points move with the training augmentation: :class:`PointSet` has the geometric interface of
:class:`~rsiseg.masks.InstanceMasks` (flips, quarter turns, resizing), so the same
:class:`~rsiseg.data.transforms.TrainTransforms` steps and draws apply to images with masks or
points. Coordinates are continuous pixels, pixel ``(r, c)`` covering ``[c, c + 1) x [r, r + 1)``:
every step takes a pixel's centre to the centre of the pixel it moves to.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsiseg.data.coco_index import DataError
from rsiseg.data.instance_points import read_point_file
from rsiseg.data.io import ImageReadError, image_size, match_bands, read_image, to_unit_float
from rsiseg.data.loader import to_chw_tensor
from rsiseg.data.transforms import TrainTransforms
from rsiseg.masks import hflip_xy, rot90_xy, vflip_xy


class PointSet:
    """The points ``xy`` float64 ``[P, 2]`` (x, y) of one ``height x width`` image, moved as masks are."""

    def __init__(self, xy: np.ndarray, height: int, width: int) -> None:
        self.xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        self.height, self.width = height, width

    def __len__(self) -> int:
        return len(self.xy)

    def hflip(self) -> PointSet:
        """Mirror left-right, as ``image[:, ::-1]``."""
        return PointSet(hflip_xy(self.xy, self.width), self.height, self.width)

    def vflip(self) -> PointSet:
        """Mirror top-bottom, as ``image[::-1]``."""
        return PointSet(vflip_xy(self.xy, self.height), self.height, self.width)

    def rot90(self, k: int = 1) -> PointSet:
        """Rotate by ``k`` quarter turns counter-clockwise, as ``np.rot90(image, k)``; H and W swap for odd k."""
        out = self
        for _ in range(k % 4):
            out = PointSet(rot90_xy(out.xy, out.width), out.width, out.height)
        return out

    def resize(self, height: int, width: int) -> PointSet:
        """Rescale to a ``height x width`` image."""
        scale = np.array([width / self.width, height / self.height])
        return PointSet(self.xy * scale, height, width)


class PointLabelDataset:
    """The images a point file names, each with its points (see the module docstring).

    Items are ``(image float [C, H, W] in [0, 1], target)`` with ``points`` float ``[N, 2]`` (x, y
    pixels), ``labels`` int64 ``[N]`` (1..K) and ``image_id`` (the item's index + 1).

    Args:
        points_file: a points JSON, CSV or GeoJSON file (:func:`read_point_file`).
        image_dir: the folder of the images, found by file name.
        class_names: the K classes in label order; the file's class names map to them. None: a points
            JSON's categories give the classes (names, ids, labels in file order); CSV/GeoJSON classes are
            then 1-based labels, named ``class_k``.
        num_classes: K, checked against every label.
        in_channels: bands the model takes (:func:`~rsiseg.data.io.match_bands`).
        transforms: training augmentation, or None.
        seed: seeds the augmentation draws with the epoch and the index.

    Raises:
        DataError: an unreadable point file or entry (from the reader), a label above K, no image with a
            point, an image file that is missing or a point outside its image (named, with the point file).
    """

    def __init__(self, points_file: str | Path, image_dir: str | Path, class_names: list[str] | None,
                 num_classes: int, in_channels: int = 3, transforms: TrainTransforms | None = None,
                 seed: int = 0) -> None:
        self.points_file, self.image_dir = Path(points_file), Path(image_dir)
        found, file_categories = read_point_file(self.points_file, class_names)
        pointless = [name for name, (xy, _) in found.items() if len(xy) == 0]
        self.entries = [(name, xy, labels) for name, (xy, labels) in found.items() if len(xy)]
        categories = file_categories if class_names is None else None
        self.class_names = (list(class_names) if class_names else [c["name"] for c in categories] if categories
                            else [f"class_{k}" for k in range(1, num_classes + 1)])
        self.label_to_category = [c["id"] for c in categories] if categories else list(range(1, num_classes + 1))
        self.in_channels, self.transforms, self.seed, self.epoch = in_channels, transforms, seed, 0
        self._report = (f"{self.points_file}: {len(self.entries)} training images, "
                        f"{sum(len(xy) for _, xy, _ in self.entries)} points"
                        + (f"; {len(pointless)} images without a point left out" if pointless else ""))
        if not self.entries:
            raise DataError(f"{self.points_file}: no image has a point to train on")
        if len(self.class_names) != num_classes:
            raise DataError(f"{self.points_file}: {len(self.class_names)} categories but model.num_classes is "
                            f"{num_classes}")
        for name, xy, labels in self.entries:
            self._check_entry(name, xy, labels, num_classes)

    def _check_entry(self, name: str, xy: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        """The image exists, holds every point, and every class label is in 1..K."""
        where = f"{self.points_file}: image {name}"
        if labels.max() > num_classes:
            raise DataError(f"{where}: a point's class label {int(labels.max())} is above model.num_classes "
                            f"({num_classes})")
        path = self.image_dir / name
        if not path.is_file():
            raise DataError(f"{where} not found in {self.image_dir}")
        try:
            height, width = image_size(path)
        except ImageReadError as err:
            raise DataError(f"{err} (named by {self.points_file})") from None
        outside = (xy[:, 0] >= width) | (xy[:, 1] >= height)
        if outside.any():
            x, y = xy[int(np.argmax(outside))]
            raise DataError(f"{where}: point ({x:g}, {y:g}) lies outside the {width} x {height} px image")

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draws; call before each epoch's loader is iterated."""
        self.epoch = epoch

    def summary(self) -> str:
        """One line for the log: what was read, and what was left out."""
        return self._report

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Item ``key``: an index, or ``(index, epoch)`` as the trainer's batch sampler yields it."""
        idx, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        name, xy, labels = self.entries[idx]
        path = self.image_dir / name
        try:
            image = to_unit_float(match_bands(read_image(path), self.in_channels, path))
        except ImageReadError as err:
            raise DataError(f"{err} (named by {self.points_file})") from None
        points = PointSet(xy, *image.shape[:2])
        if self.transforms is not None:
            image, points = self.transforms(image, points, zlib.crc32(f"{self.seed}/{epoch}/{idx}".encode()))
        return to_chw_tensor(image), {"points": torch.from_numpy(points.xy).float(),
                                      "labels": torch.from_numpy(labels).long(), "image_id": torch.tensor(idx + 1)}
