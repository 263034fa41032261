"""Box prompts for any R-CNN of this package: encode an image once, then segment user boxes cheaply.

:func:`encode_images` runs what does not depend on the boxes (resize and normalisation, backbone
and FPN, and a prompter's per-image part such as the GPM's global tokens); :func:`segment_boxes`
then runs only the RoI path for each new set of boxes: the box head for a class and a score, the
mask head (with the box's prompts, where the model has prompt modules) for a mask inside the box.
Works for every model assembled by :func:`~rsiseg.models.layers.rcnn_assembly.assemble_mask_rcnn`
(Mask R-CNN, the attention model, Cascade, the prompt models).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes


class EncodedImages(NamedTuple):
    """A batch's box-independent part. ``batch``: the network input (an ``ImageList``); ``features``:
    the FPN levels; ``original_sizes``: (H, W) as given; ``prompt_context``: the prompter's encoding
    (None without prompt modules)."""

    batch: ImageList
    features: dict[str, Tensor]
    original_sizes: list[tuple[int, int]]
    prompt_context: Any

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """Each image's (H, W) at network input."""
        return list(self.batch.image_sizes)


def prompt_context(model: nn.Module, images: list[Tensor], batch: ImageList) -> Any:
    """The RoI heads' prompter encoding of a batch, or None without a prompter.

    Args:
        images: the ``[C, H, W]`` float images in [0, 1] as the model was given them (before resizing):
            the prompts crop each box from these, at their own resolution.
        batch: the network input ``model.transform`` made of them (its ``image_sizes`` map the boxes back).
    """
    prompter = getattr(model.roi_heads, "prompter", None)
    if prompter is None:
        return None
    sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    originals = model.transform.batch_images(list(images), size_divisible=1)  # one copy, normalised in place
    mean = torch.as_tensor(model.transform.image_mean, dtype=originals.dtype, device=originals.device)[:, None, None]
    std = torch.as_tensor(model.transform.image_std, dtype=originals.dtype, device=originals.device)[:, None, None]
    originals.sub_(mean).div_(std)
    for image, (height, width) in zip(originals, sizes):  # the padding stays 0, as the network input's
        image[:, height:] = 0
        image[:, :, width:] = 0
    return prompter.encode(originals, sizes, list(batch.image_sizes))


@torch.no_grad()
def encode_images(model: nn.Module, images: list[Tensor]) -> EncodedImages:
    """Encode float ``[C, H, W]`` images in [0, 1] (the model's device) for later box prompts."""
    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)
    original = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    return EncodedImages(batch, features, original, prompt_context(model, images, batch))


@torch.no_grad()
def detect_encoded(model: nn.Module, encoded: EncodedImages) -> list[dict[str, Tensor]]:
    """The model's automatic detections (as its eval forward gives them) from an encoding, without a
    second pass through the backbone: the prompts and the detections of an image share one encoding."""
    proposals, _ = model.rpn(encoded.batch, encoded.features)
    detections, _ = model.roi_heads(encoded.features, proposals, encoded.image_sizes,
                                    prompt_context=encoded.prompt_context)
    return model.transform.postprocess(detections, encoded.image_sizes, encoded.original_sizes)


@torch.no_grad()
def segment_boxes(model: nn.Module, encoded: EncodedImages, boxes: list[Tensor]) -> list[dict[str, Tensor]]:
    """One mask, class and score per user box.

    Args:
        encoded: from :func:`encode_images`.
        boxes: per image ``[K_i, 4]`` float xyxy boxes in the image's own pixels.

    Returns:
        Per image ``boxes`` ``[K_i, 4]`` (the prompts, unchanged), ``labels`` int64 ``[K_i]`` (the most
        likely object class, 1..num_classes), ``scores`` ``[K_i]`` (its probability), ``roi_masks``
        ``[K_i, M, M]`` (mask probabilities inside each box, as detections carry them) and
        ``image_size`` int64 ``[2]``: the format of the model's detections.
    """
    if len(boxes) != len(encoded.image_sizes):
        raise ValueError(f"got boxes for {len(boxes)} images, but {len(encoded.image_sizes)} were encoded")
    device = next(iter(encoded.features.values())).device
    scaled = [resize_boxes(b.to(device, torch.float32).reshape(-1, 4), original, resized)
              for b, original, resized in zip(boxes, encoded.original_sizes, encoded.image_sizes)]
    heads = model.roi_heads
    probs = heads.box_class_probs(encoded.features, scaled, encoded.image_sizes, encoded.prompt_context)
    scores, labels = probs[:, 1:].max(dim=1)
    counts = [len(b) for b in scaled]
    labels = list((labels + 1).split(counts))
    masks = heads.mask_probs(encoded.features, scaled, labels, encoded.image_sizes, encoded.prompt_context)
    return [
        {"boxes": b.to(device, torch.float32).reshape(-1, 4), "labels": lab, "scores": s, "roi_masks": m,
         "image_size": torch.tensor(size, dtype=torch.int64)}
        for b, lab, s, m, size in zip(boxes, labels, scores.split(counts), masks, encoded.original_sizes)
    ]
