"""Running a trained model: load from a checkpoint, predict batches, evaluate a dataset.

Predictions keep each detection's ``M x M`` mask probabilities (``roi_masks``) and are turned
into COCO results (RLE masks pasted inside each box) image by image, so a dense scene never
holds a full-size mask. Evaluation reads images only: the ground truth is scored from the JSON.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from rsiseg.checkpoint import load_checkpoint
from rsiseg.config import EvalConfig, ExperimentConfig, ModelConfig, config_from_dict
from rsiseg.data.coco import CocoInstanceDataset
from rsiseg.data.io import match_bands, to_unit_float
from rsiseg.data.loader import collate, to_chw_tensor
from rsiseg.evaluation.coco import evaluate_coco
from rsiseg.inference.export import prediction_to_coco
from rsiseg.inference.fast import FastOptions
from rsiseg.models.layers.box_prompting import encode_images, segment_boxes
from rsiseg.models.registry import build_model


@dataclass
class LoadedModel:
    """A model in eval mode with what is needed to name its outputs."""

    model: nn.Module
    config: ExperimentConfig
    class_names: list[str]
    label_to_category: list[int]  # [i] is the category id of label i + 1
    device: torch.device


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(checkpoint: str | Path, device: str = "auto", overrides: dict[str, Any] | None = None) -> LoadedModel:
    """Rebuild the model from the config stored in a checkpoint and load its weights.

    Args:
        overrides: ``ModelConfig`` fields to change for inference (e.g. ``detections_per_img``).
    """
    return model_from_state(load_checkpoint(checkpoint), device, overrides, source=str(checkpoint))


def stored_config(state: dict[str, Any], source: str = "checkpoint") -> ExperimentConfig:
    """The experiment config stored in a loaded checkpoint."""
    return config_from_dict(state["config"], source=f"{source} (stored config)")


def model_from_state(
    state: dict[str, Any], device: str = "auto", overrides: dict[str, Any] | None = None, source: str = "checkpoint",
    fast: FastOptions | None = None,
) -> LoadedModel:
    """:func:`load_model` for a checkpoint already read with :func:`load_checkpoint`.

    Args:
        fast: the inference path of :mod:`rsiseg.inference.fast` (by default folded batch norms and
            channels-last weights: the same outputs up to float rounding, 1.7-1.9x faster for R50 on
            CPU); None runs the modules unchanged. The model is then for inference only.
    """
    raw = state["config"]
    if overrides:
        raw = {**raw, "model": {**raw["model"], **overrides}}
    cfg = config_from_dict(raw, source=f"{source} (stored config)")
    model = build_model(without_initial_weights(cfg.model))
    model.load_state_dict(state["model"])
    dev = select_device(device)
    model.to(dev).eval()
    if fast is not None:
        fast.apply(model, dev)
    classes = state.get("classes") or {}
    names = classes.get("names") or [f"class_{i}" for i in range(1, cfg.model.num_classes + 1)]
    category_ids = classes.get("category_ids") or list(range(1, cfg.model.num_classes + 1))
    return LoadedModel(model, cfg, list(names), list(category_ids), dev)


def without_initial_weights(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` without the files that only initialise training: the checkpoint holds every weight.

    A checkpoint must load on a machine without the ImageNet download, the backbone file or the
    class-weights file it was trained from.
    """
    return replace(cfg, pretrained="none", backbone_checkpoint=None, seg=replace(cfg.seg, class_weights=None),
                   sam=replace(cfg.sam, checkpoint=None))


@torch.no_grad()
def predict_images(model: nn.Module, images: Sequence[torch.Tensor], device: torch.device,
                   prompts: list[dict[str, torch.Tensor]] | None = None) -> list[dict[str, torch.Tensor]]:
    """Predict one batch of ``[C, H, W]`` float images in [0, 1] (a prompted model: answer ``prompts``, one dict
    per image); outputs are moved to CPU."""
    model.eval()
    images = [img.to(device, non_blocking=True) for img in images]
    if prompts is not None:
        prompts = [{k: v.to(device) for k, v in p.items()} for p in prompts]
        outputs = model(images, prompts=prompts)
    else:
        outputs = model(images)
    return [{k: v.cpu() for k, v in out.items()} for out in outputs]


def iterate_predictions(
    model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 2, num_workers: int = 0,
    progress: bool = True, desc: str = "predict",
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]]:
    """Yield ``(prediction, target, image)`` for every item of a detection dataset."""
    # A private generator: the loader must not draw on the global RNG that training resumes exactly.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        for pred, target, image in zip(predict_images(model, images, device), targets, images):
            yield pred, target, image


def predict_dataset(
    model: nn.Module, dataset: CocoInstanceDataset, eval_cfg: EvalConfig, device: torch.device,
    num_workers: int = 0, progress: bool = True, label_to_category: list[int] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> list[dict[str, Any]]:
    """COCO results (bbox + RLE segmentation) for every image of ``dataset`` (its images only are read).

    ``label_to_category`` (the data's category id of each model label, see
    :func:`rsiseg.inference.classes.map_labels_to_categories`) defaults to the dataset's own order.
    ``shard = (rank, world_size)`` predicts images ``rank, rank + world_size, ...`` only (a distributed run).
    """
    results: list[dict[str, Any]] = []
    images = dataset.images_only()
    rank, world = shard
    if world > 1:
        images = Subset(images, range(rank, len(images), world))
    for pred, target, _ in iterate_predictions(model, images, device, eval_cfg.batch_size, num_workers, progress):
        results += prediction_to_coco(
            pred, int(target["image_id"]), label_to_category or dataset.label_to_category,
            score_threshold=eval_cfg.score_threshold, mask_threshold=eval_cfg.mask_threshold,
        )
    return results


def evaluate_model(
    model: nn.Module, dataset: CocoInstanceDataset, eval_cfg: EvalConfig, device: torch.device,
    num_workers: int = 0, progress: bool = True, label_to_category: list[int] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Predict ``dataset`` and compute COCO metrics against its checked ground truth.

    Returns:
        ``(metrics, results)``: metrics as from :func:`rsiseg.evaluation.coco.evaluate_coco`.
    """
    results = predict_dataset(model, dataset, eval_cfg, device, num_workers, progress, label_to_category)
    return score_results(dataset, results, eval_cfg), results


def score_results(dataset: CocoInstanceDataset, results: list[dict[str, Any]], eval_cfg: EvalConfig) -> dict[str, Any]:
    """COCO metrics of ``results`` against ``dataset``'s checked ground truth (:func:`evaluate_coco`)."""
    return evaluate_coco(
        dataset.index.to_coco(), results, iou_types=tuple(eval_cfg.iou_types), preset=eval_cfg.preset,
        max_dets=tuple(eval_cfg.max_dets) if eval_cfg.max_dets else None,
    )


class Predictor:
    """A loaded model that answers detections and prompts image by image (``Predictor.segment``).

    Images are ``[H, W, C]`` arrays as :func:`rsiseg.data.io.read_image` gives them (any dtype,
    bands matched to the model) or ``[C, H, W]`` tensors (float in [0, 1], or integer, scaled by its
    dtype's range). :meth:`segment` encodes an image once (backbone, FPN, the prompter's global part)
    and answers every later prompt on an image of the same values from that cache, so a prompt costs
    only the RoI heads (passing ``image=None`` also skips converting and comparing it).
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._tensor: torch.Tensor | None = None  # the encoded image, as the model took it
        self._encoded: Any = None  # EncodedImages, or a PointSam's Encoded

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str = "auto",
                        overrides: dict[str, Any] | None = None) -> Predictor:
        return cls(load_model(checkpoint, device, overrides))

    def as_tensor(self, image: Any) -> torch.Tensor:
        """The model's input for ``image``: float ``[C, H, W]`` on the model's device.

        Raises:
            ValueError: a tensor that is not ``[C, H, W]`` with the model's band count.
        """
        bands = self.loaded.config.model.in_channels
        if isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.shape[0] != bands:
                raise ValueError(f"an image tensor must be [C, H, W] with C = model.in_channels = {bands}: got "
                                 f"shape {tuple(image.shape)} (pass an [H, W, C] image as a numpy array)")
            tensor = image.float() if image.is_floating_point() else torch.from_numpy(to_unit_float(image.cpu().numpy()))
        else:
            tensor = to_chw_tensor(to_unit_float(match_bands(np.asarray(image), bands, "image")))
        return tensor.to(self.loaded.device)

    def predict(self, image: Any) -> dict[str, torch.Tensor]:
        """Automatic detections of one image (CPU tensors), as :func:`predict_images` gives them."""
        return predict_images(self.loaded.model, [self.as_tensor(image)], self.loaded.device)[0]

    @property
    def takes_points(self) -> bool:
        """Whether the model answers point prompts (PointSAM); the R-CNN models take boxes only."""
        return hasattr(self.loaded.model, "answer")

    @torch.no_grad()
    def set_image(self, image: Any) -> None:
        """Encode ``image`` for the prompts that follow."""
        self._encode(self.as_tensor(image), copy=isinstance(image, torch.Tensor))

    @torch.no_grad()  # a kept encoding must not hold an autograd graph (PointSAM's encoder may train)
    def _encode(self, tensor: torch.Tensor, copy: bool) -> None:
        model = self.loaded.model
        self._encoded = model.encode([tensor]) if self.takes_points else encode_images(model, [tensor])
        self._tensor = tensor.clone() if copy else tensor  # a copy: the caller may change its tensor in place

    def _use_image(self, image: Any) -> None:
        """Encode ``image`` unless it holds the values of the one encoded last; None: keep the last one.

        Raises:
            ValueError: no image given and none encoded before.
        """
        if image is not None:
            tensor = self.as_tensor(image)
            cached = self._tensor
            if cached is None or tensor.shape != cached.shape or not torch.equal(tensor, cached):
                self._encode(tensor, copy=isinstance(image, torch.Tensor))
        if self._encoded is None:
            raise ValueError("segment() needs an image (none was given or set before)")

    @property
    def _image_size(self) -> tuple[int, int]:
        return tuple(self._tensor.shape[-2:])

    def segment(self, image: Any = None, boxes: Any = None, points: Any = None,
                point_labels: Any = None) -> dict[str, torch.Tensor]:
        """One mask, class and score per box prompt on ``image`` (the encoded one when None or of the same values).

        Args:
            boxes: ``[K, 4]`` xyxy in the image's pixels (array, list or tensor).
            points, point_labels: point prompts, for point-prompted models (PointSAM) only: ``[K, 2]``
                (one point per prompt) or ``[K, P, 2]`` (x, y) pixels, labels ``[K, P]`` (1 object, 0
                background; default all 1). With both points and boxes, prompt k holds both.

        Returns:
            CPU tensors ``boxes`` ``[K, 4]``, ``labels`` ``[K]``, ``scores`` ``[K]``, ``roi_masks``
            ``[K, 28, 28]`` (inside each box) and ``image_size``; :func:`rsiseg.inference.paste.paste_full`
            gives full-size masks. A point-prompted model gives ``masks`` float ``[K, 1, H, W]``
            probabilities instead of ``roi_masks``, and its ``scores`` are predicted mask IoUs.
        """
        name = self.loaded.config.model.name
        if self.takes_points:
            return self._segment_points(image, boxes, points, point_labels)
        if not hasattr(self.loaded.model, "roi_heads"):
            raise ValueError(f"model {name!r} takes no prompts: box prompts need an R-CNN (a model with RoI heads)")
        if points is not None or point_labels is not None:
            raise ValueError(f"model {name!r} takes box prompts only, not points")
        if boxes is None:
            raise ValueError("segment() needs boxes=[[x1, y1, x2, y2], ...]")
        self._use_image(image)
        prompts = check_boxes(boxes, self._image_size)
        out = segment_boxes(self.loaded.model, self._encoded, [prompts.to(self.loaded.device)])[0]
        return {k: v.cpu() for k, v in out.items()}

    def _segment_points(self, image: Any, boxes: Any, points: Any, point_labels: Any) -> dict[str, torch.Tensor]:
        if points is None and boxes is None:
            raise ValueError("segment() needs points=[[x, y], ...] and/or boxes=[[x1, y1, x2, y2], ...]")
        self._use_image(image)
        device = self.loaded.device
        coords = labels = box_tensor = None
        if points is not None:
            coords = torch.as_tensor(np.asarray(points, dtype=np.float32))
            coords = coords[:, None] if coords.dim() == 2 else coords
            if coords.dim() != 3 or coords.shape[-1] != 2:
                raise ValueError(f"points must be [K, 2] or [K, P, 2] (x, y), got shape {tuple(coords.shape)}")
            if point_labels is not None:  # None: the model's default, all 1
                labels = torch.as_tensor(np.asarray(point_labels, dtype=np.float32)).reshape(coords.shape[:2])
                labels = labels.to(device)
            coords = coords.to(device)
            check_points(coords, self._image_size)
        if boxes is not None:
            box_tensor = check_boxes(boxes, self._image_size).to(device)
        if coords is not None and box_tensor is not None and len(coords) != len(box_tensor):
            raise ValueError(f"{len(coords)} point prompts but {len(box_tensor)} boxes: prompt k pairs points k with box k")
        out = self.loaded.model.answer(self._encoded, 0, points=coords, point_labels=labels, boxes=box_tensor)
        return {k: v.cpu() for k, v in out.items()}


def check_points(points: torch.Tensor, image_size: tuple[int, int]) -> None:
    """Refuse point prompts ``[K, P, 2]`` (x, y) that are not finite or lie outside the image."""
    height, width = image_size
    x, y = points[..., 0], points[..., 1]
    bad = ~torch.isfinite(points).all(-1) | (x < 0) | (y < 0) | (x > width) | (y > height)
    if bad.any():
        k, j = (int(v) for v in torch.nonzero(bad)[0])
        raise ValueError(f"point prompt {k} (point {j}) {points[k, j].tolist()} is not inside the {width}x{height} "
                         f"image ({int(bad.sum())} bad points)")


def check_boxes(boxes: Any, image_size: tuple[int, int]) -> torch.Tensor:
    """Box prompts as float ``[K, 4]`` xyxy, refused with a clear error when malformed or outside the image."""
    tensor = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4) if len(boxes) else torch.zeros(0, 4)
    height, width = image_size
    bad = ~torch.isfinite(tensor).all(1) | (tensor[:, 2] <= tensor[:, 0]) | (tensor[:, 3] <= tensor[:, 1])
    bad |= (tensor[:, 2] <= 0) | (tensor[:, 3] <= 0) | (tensor[:, 0] >= width) | (tensor[:, 1] >= height)
    if bad.any():
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"box prompt {first} {tensor[first].tolist()} is not a box x1 < x2, y1 < y2 that meets "
                         f"the {width}x{height} image ({int(bad.sum())} of {len(tensor)} boxes are bad)")
    return tensor
