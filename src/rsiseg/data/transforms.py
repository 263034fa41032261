"""Training augmentation: geometry on the image and on compact instance masks, colour with albumentations.

Geometric steps (resizing, flips, 90-degree rotations) change the image and the
:class:`~rsiseg.masks.InstanceMasks` together: the masks move as polygons or small crops, never as
N full-size rasters, which is what keeps dense scenes (thousands of instances) cheap. The point
labels of the prompted task (:class:`~rsiseg.data.point_labels.PointSet`) move through the same steps.
Photometric steps touch only the image and stay in albumentations. Every draw comes from one
per-sample seed, so runs and resumed runs see the same augmentations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import albumentations as A
import cv2
import numpy as np

from rsiseg.config import DataConfig


class Geometry(Protocol):
    """What moves with the image: :class:`~rsiseg.masks.InstanceMasks`, or a point set."""

    def hflip(self) -> Geometry: ...

    def vflip(self) -> Geometry: ...

    def rot90(self, k: int = 1) -> Geometry: ...

    def resize(self, height: int, width: int) -> Geometry: ...


Sample = tuple[np.ndarray, Geometry]  # float32 [H, W, C] in [0, 1], the masks (or points) of that image
GeometricStep = Callable[[np.ndarray, Geometry, np.random.Generator], Sample]


def rescale_sample(image: np.ndarray, masks: Geometry, scale: float) -> Sample:
    """Rescale the image (bilinear, per band) and its masks by ``scale``, keeping the aspect ratio."""
    h, w = image.shape[:2]
    height, width = max(1, round(h * scale)), max(1, round(w * scale))
    if (height, width) == (h, w):
        return image, masks
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return resized.reshape(height, width, -1), masks.resize(height, width)


@dataclass(frozen=True)
class LongestMaxSize:
    """Shrink (or enlarge) so that the longest side is ``max_size``, keeping the aspect ratio."""

    max_size: int

    def __call__(self, image: np.ndarray, masks: Geometry, rng: np.random.Generator) -> Sample:
        return rescale_sample(image, masks, self.max_size / max(image.shape[:2]))


@dataclass(frozen=True)
class RandomScale:
    """Rescale by a factor drawn uniformly from ``[low, high]``, keeping the aspect ratio."""

    low: float
    high: float

    def __call__(self, image: np.ndarray, masks: Geometry, rng: np.random.Generator) -> Sample:
        return rescale_sample(image, masks, rng.uniform(self.low, self.high))


@dataclass(frozen=True)
class RandomFlip:
    """Mirror left-right (``axis=1``) or top-bottom (``axis=0``) with probability ``p``."""

    axis: int
    p: float

    def __call__(self, image: np.ndarray, masks: Geometry, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
            return image, masks
        return np.flip(image, self.axis), masks.hflip() if self.axis == 1 else masks.vflip()


@dataclass(frozen=True)
class RandomRotate90:
    """With probability ``p``, rotate by k quarter turns, k uniform in 0..3 (as albumentations' RandomRotate90)."""

    p: float

    def __call__(self, image: np.ndarray, masks: Geometry, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
            return image, masks
        k = int(rng.integers(0, 4))
        return np.rot90(image, k), masks.rot90(k)


class TrainTransforms:
    """The training pipeline: geometric steps in order, then the photometric albumentations pipeline.

    Args:
        geometric: steps ``(image, masks, rng) -> (image, masks)``.
        photometric: albumentations pipeline for the image alone, or None.
    """

    def __init__(self, geometric: list[GeometricStep], photometric: A.Compose | None) -> None:
        self.geometric, self.photometric = geometric, photometric

    def __call__(self, image: np.ndarray, masks: Geometry, seed: int) -> Sample:
        """Augment one sample.

        Args:
            image: ``float32 [H, W, C]`` in [0, 1].
            masks: the image's instance masks, or its point set (anything :class:`Geometry`).
            seed: derived from (experiment seed, epoch, sample index) by the caller.

        Returns:
            The augmented ``float32 [H', W', C]`` image (contiguous, in [0, 1]) and masks.
        """
        rng = np.random.default_rng(seed)
        for step in self.geometric:
            image, masks = step(image, masks, rng)
        image = np.ascontiguousarray(image, dtype=np.float32)
        if self.photometric is not None:
            self.photometric.set_random_seed(seed)
            image = np.clip(self.photometric(image=image)["image"], 0.0, 1.0).astype(np.float32, copy=False)
        return image, masks


def build_train_transforms(cfg: DataConfig, bands: int) -> TrainTransforms | None:
    """The training pipeline the data config asks for; None when every augmentation is off."""
    geometric: list[GeometricStep] = []
    if cfg.max_size:
        geometric.append(LongestMaxSize(cfg.max_size))
    low, high = cfg.scale_range
    if (low, high) != (1.0, 1.0):
        geometric.append(RandomScale(low, high))
    if cfg.hflip > 0:
        geometric.append(RandomFlip(1, cfg.hflip))
    if cfg.vflip > 0:
        geometric.append(RandomFlip(0, cfg.vflip))
    if cfg.rot90 > 0:
        geometric.append(RandomRotate90(cfg.rot90))
    photometric = None
    if cfg.color_jitter > 0:
        s = cfg.color_jitter
        if bands == 3 and cfg.jitter_saturation_hue:
            op = A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4), p=0.8)
        else:  # ColorJitter is defined for RGB only; brightness/contrast work for any band count
            op = A.RandomBrightnessContrast(brightness_limit=s, contrast_limit=s, p=0.8)
        photometric = A.Compose([op], seed=0)
    if not geometric and photometric is None:
        return None
    return TrainTransforms(geometric, photometric)
