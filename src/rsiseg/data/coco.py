"""COCO instance dataset: polygons or RLE, kept compact (never N full-size rasters).

Items follow the target contract (see ``rsiseg.structures``): ``image`` float ``[C, H, W]`` in
[0, 1] and a target with ``boxes`` float ``[N, 4]`` xyxy in pixels, ``labels`` int64 ``[N]`` in
1..K, ``masks`` an :class:`~rsiseg.masks.InstanceMasks` (polygons or per-instance crops) and
``image_id``. Images without instances are kept (N = 0). Crowd regions are left out of the targets.
With ``load_targets=False`` (evaluation and prediction) the target holds only ``image_id``.
"""

from __future__ import annotations

import copy
import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from rsiseg.data.coco_index import CocoIndex, DataError, load_coco_index
from rsiseg.data.io import ImageReadError, match_bands, read_image, to_unit_float
from rsiseg.data.loader import to_chw_tensor
from rsiseg.data.transforms import TrainTransforms
from rsiseg.masks import InstanceMasks

log = logging.getLogger(__name__)

Target = dict[str, torch.Tensor]


class CocoInstanceDataset(Dataset):
    """Instance segmentation dataset over a checked COCO JSON.

    Args:
        ann_file: COCO instances JSON.
        image_dir: folder that ``file_name`` entries are relative to.
        in_channels: bands the model expects; grey/RGB are converted, other mismatches raise.
        transforms: the training pipeline (see :mod:`rsiseg.data.transforms`), seeded per sample.
        repair: skip and count bad annotations instead of raising.
        seed: base of the per-sample augmentation seeds.
        load_targets: False reads images only (the target is just ``image_id``), as evaluation does.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        *,
        in_channels: int = 3,
        transforms: TrainTransforms | None = None,
        repair: bool = False,
        seed: int = 0,
        load_targets: bool = True,
    ) -> None:
        self.index: CocoIndex = load_coco_index(ann_file, image_dir, repair=repair)
        self.in_channels = in_channels
        self.transforms = transforms
        self.seed = seed
        self.load_targets = load_targets
        self.epoch = 0
        self._cat_to_label = self.index.category_to_label

    def __len__(self) -> int:
        return len(self.index.images)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draws; call before each epoch's loader is iterated."""
        self.epoch = epoch

    @property
    def class_names(self) -> list[str]:
        return self.index.class_names

    def summary(self) -> str:
        """One line for the log: what was read, and what was skipped or repaired."""
        return self.index.report.summary()

    @property
    def label_to_category(self) -> list[int]:
        return self.index.label_to_category

    def load_image(self, idx: int) -> np.ndarray:
        """Image ``idx`` as ``float32 [H, W, C]`` in [0, 1], checked against its JSON entry."""
        info = self.index.images[idx]
        path = self.index.image_dir / info["file_name"]
        try:
            image = match_bands(read_image(path), self.in_channels, path)
        except ImageReadError as err:
            raise DataError(f"{err} (image id {info['id']} in {self.index.ann_file})") from None
        if image.shape[:2] != (info["height"], info["width"]):
            raise DataError(
                f"{path}: size {image.shape[1]}x{image.shape[0]} does not match width/height "
                f"{info['width']}x{info['height']} of image id {info['id']} in {self.index.ann_file}"
            )
        return to_unit_float(image)

    def images_only(self) -> CocoInstanceDataset:
        """A view of this dataset that reads images and image ids only (no masks, no augmentation)."""
        view = copy.copy(self)
        view.transforms, view.load_targets = None, False
        return view

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, Target]:
        """Item ``key``: an index, or ``(index, epoch)`` as the trainer's batch sampler yields it.

        Passing the epoch with the index keeps augmentation draws right in persistent loader
        workers, which never see :meth:`set_epoch` calls made in the main process.
        """
        idx, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        info = self.index.images[idx]
        image = self.load_image(idx)
        if not self.load_targets:
            return to_chw_tensor(image), {"image_id": torch.tensor(info["id"])}
        anns = [a for a in self.index.anns_by_image[info["id"]] if not a["iscrowd"]]
        masks = self._masks(anns, info)
        labels = torch.tensor([self._cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        if self.transforms is not None:
            image, masks = self.transforms(image, masks, zlib.crc32(f"{self.seed}/{epoch}/{idx}".encode()))
        keep = masks.areas() > 0  # instances an augmentation moved out of view or shrank to nothing
        masks = masks[keep]
        target = {"boxes": masks.boxes(), "labels": labels[keep], "masks": masks, "image_id": torch.tensor(info["id"])}
        return to_chw_tensor(image), target

    def _masks(self, anns: list[dict[str, Any]], info: dict[str, Any]) -> InstanceMasks:
        """Compact masks of ``anns``; an annotation with no mask pixels falls back to its box."""
        height, width = info["height"], info["width"]
        masks = InstanceMasks.from_coco([a["segmentation"] for a in anns], height, width)
        empty = torch.nonzero(masks.areas() == 0).flatten().tolist()
        if not empty:
            return masks
        # Tiny or missing polygons rasterise to nothing; the box keeps the instance alive.
        log.warning("%s: annotation id(s) %s have no mask pixels; their boxes are used as masks",
                    self.index.ann_file, [anns[i]["id"] for i in empty])
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (anns[i]["bbox"] for i in empty)]
        instances = masks.instances
        for i, filled in zip(empty, InstanceMasks.from_boxes(boxes, height, width).instances):
            instances[i] = filled
        return InstanceMasks(instances, height, width)
