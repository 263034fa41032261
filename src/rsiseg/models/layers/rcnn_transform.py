"""The R-CNN input transform for compact masks: images are resized, instance masks never are.

torchvision's :class:`GeneralizedRCNNTransform` resizes every target mask to the network input
size as a float tensor (2,000 instances on an 800 px image: 4.9 GB). Here the
:class:`~rsiseg.masks.InstanceMasks` stay at the source resolution and the target records the
resize factor as ``mask_scale``; mask targets are then sampled per RoI at source resolution (see
:mod:`rsiseg.models.layers.mask_targets`). In eval, boxes go back to the original image and the
per-box mask probabilities (``roi_masks``) are kept as they are: pasting happens at export.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from rsiseg.masks import InstanceMasks


class CompactMaskTransform(GeneralizedRCNNTransform):
    """Normalise, resize and batch images; keep instance masks compact.

    Training targets: ``boxes`` float ``[N, 4]``, ``labels`` int64 ``[N]``, ``masks``
    :class:`~rsiseg.masks.InstanceMasks` of the input image (full-size ``uint8 [N, H, W]`` masks
    are accepted and made compact). After :meth:`resize` a target also
    holds ``mask_scale``: float ``[2]`` = (resized width / width, resized height / height).

    Eval outputs (after :meth:`postprocess`): ``boxes`` in original-image pixels, ``image_size``
    int64 ``[2]`` = (H, W), and the model's ``roi_masks`` untouched.
    """

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        if target is None or "masks" not in target:
            return super().resize(image, target)
        masks = target.pop("masks")
        if isinstance(masks, Tensor):  # full-size uint8 [N, H, W], as torchvision's models take them
            masks = InstanceMasks.from_masks(masks.cpu())
        height, width = image.shape[-2:]
        if tuple(masks.image_size) != (height, width):
            raise ValueError(f"target masks are for a {masks.image_size[1]}x{masks.image_size[0]} image, "
                             f"but the image is {width}x{height}")
        image, target = super().resize(image, target)
        target["masks"] = masks
        target["mask_scale"] = torch.tensor([image.shape[-1] / width, image.shape[-2] / height],
                                            dtype=torch.float32, device=image.device)
        return image, target

    def postprocess(
        self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for pred, resized, original in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], resized, original)
            pred["image_size"] = torch.tensor(original, dtype=torch.int64)
        return result
