"""COCO instance dataset: polygons or RLE, masks decoded only when an item is fetched.

Items follow the torchvision detection contract (see ``rsiseg.structures``):
``image`` float ``[C, H, W]`` in [0, 1] and a target with ``boxes`` float ``[N, 4]`` xyxy in
pixels, ``labels`` int64 ``[N]`` in 1..K, ``masks`` uint8 ``[N, H, W]`` and ``image_id``.
Images without instances are kept (N = 0). Crowd regions are left out of the targets.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from rsiseg.data.coco_index import CocoIndex, DataError, load_coco_index
from rsiseg.data.io import ImageReadError, match_bands, read_image, to_unit_float
from rsiseg.data.transforms import apply_transforms
from rsiseg.structures import masks_to_boxes, segmentation_to_mask

log = logging.getLogger(__name__)

Target = dict[str, torch.Tensor]


class CocoInstanceDataset(Dataset):
    """Instance segmentation dataset over a checked COCO JSON.

    Args:
        ann_file: COCO instances JSON.
        image_dir: folder that ``file_name`` entries are relative to.
        in_channels: bands the model expects; grey/RGB are converted, other mismatches raise.
        transforms: albumentations pipeline (training only), seeded per sample.
        repair: skip and count bad annotations instead of raising.
        seed: base of the per-sample augmentation seeds.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        *,
        in_channels: int = 3,
        transforms: A.Compose | None = None,
        repair: bool = False,
        seed: int = 0,
    ) -> None:
        self.index: CocoIndex = load_coco_index(ann_file, image_dir, repair=repair)
        self.in_channels = in_channels
        self.transforms = transforms
        self.seed = seed
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

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, Target]:
        info = self.index.images[idx]
        image = self.load_image(idx)
        anns = [a for a in self.index.anns_by_image[info["id"]] if not a["iscrowd"]]
        masks = [self._decode(a, info) for a in anns]
        labels = [self._cat_to_label[a["category_id"]] for a in anns]
        if self.transforms is not None:
            seed = zlib.crc32(f"{self.seed}/{self.epoch}/{idx}".encode())
            image, masks = apply_transforms(self.transforms, image, masks, seed)
        height, width = image.shape[:2]
        mask_tensor = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
        keep = mask_tensor.flatten(1).amax(dim=1) > 0 if len(masks) else torch.zeros(0, dtype=torch.bool)  # instances an augmentation moved out of view
        target = {
            "boxes": masks_to_boxes(mask_tensor[keep]),
            "labels": torch.tensor(labels, dtype=torch.int64)[keep] if labels else torch.zeros(0, dtype=torch.int64),
            "masks": mask_tensor[keep],
            "image_id": torch.tensor(info["id"]),
        }
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), target

    def _decode(self, ann: dict[str, Any], info: dict[str, Any]) -> np.ndarray:
        """``uint8 [H, W]`` mask; an annotation with no mask pixels falls back to its box."""
        height, width = info["height"], info["width"]
        mask = (
            segmentation_to_mask(ann["segmentation"], height, width)
            if ann["segmentation"]
            else np.zeros((height, width), np.uint8)
        )
        if not mask.any():
            # Tiny or missing polygons rasterise to nothing; the box keeps the instance alive.
            log.warning("%s: annotation id %s has no mask pixels; its box is used as the mask", self.index.ann_file, ann["id"])
            x, y, w, h = ann["bbox"]
            x1, y1 = int(np.floor(x)), int(np.floor(y))
            mask[y1 : max(y1 + 1, int(np.ceil(y + h))), x1 : max(x1 + 1, int(np.ceil(x + w)))] = 1
        return mask


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Keep images and targets as lists: detection images differ in size."""
    images, targets = zip(*batch)
    return list(images), list(targets)
