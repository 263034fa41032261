"""COCO instances with one point prompt per instance: the data of the ``prompted`` task.

Each item is a :class:`~rsiseg.data.coco.CocoInstanceDataset` item (after its augmentation) whose target
also holds ``points``: float ``[N, 2]`` (x, y) image pixels, the pixel centre of one interior point of
each instance, derived from the instance's (augmented) mask by ``data.instance_points``:

- ``center``: the interior pixel farthest from the mask's border, the click a person would make;
- ``random``: a uniformly drawn interior pixel, seeded by ``(train.seed, image)``. Under a geometric
  augmentation the drawn pixel is drawn again for each view.

In the weakly supervised modes the masks only give these points (and, for evaluation, the score);
the model never sees them. An annotation whose mask rasterises to nothing is prompted from its box
(the dataset's fallback); ``rsiseg data points`` skips and counts such annotations instead.
"""

from __future__ import annotations

from typing import Any

import torch

from rsiseg.data.coco import CocoInstanceDataset
from rsiseg.data.instance_points import instance_points


class PointPromptDataset:
    """``base`` with a ``points`` entry in every target (see the module docstring).

    Args:
        base: the COCO instance dataset (with its training transforms, or none for evaluation).
        rule: ``center`` or ``random``.
        seed: seeds the ``random`` rule.
    """

    def __init__(self, base: CocoInstanceDataset, rule: str = "center", seed: int = 0) -> None:
        self.base, self.rule, self.seed = base, rule, seed

    def __len__(self) -> int:
        return len(self.base)

    @property
    def class_names(self) -> list[str]:
        return self.base.class_names

    @property
    def label_to_category(self) -> list[int]:
        return self.base.label_to_category

    @property
    def index(self) -> Any:
        """The base dataset's checked COCO index (the ground truth the evaluation scores against)."""
        return self.base.index

    def summary(self) -> str:
        return self.base.summary()

    def annotation_ids(self, idx: int) -> list[int]:
        """The COCO annotation ids of item ``idx``'s instances, in target order (evaluation items only:
        an augmentation may drop instances)."""
        info = self.base.index.images[idx]
        return [a["id"] for a in self.base.index.anns_by_image[info["id"]] if not a["iscrowd"]]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.base[key]
        points = instance_points(target["masks"], self.rule, self.seed, key=str(int(target["image_id"])))
        target["points"] = torch.from_numpy(points).float().reshape(-1, 2)
        return image, target
