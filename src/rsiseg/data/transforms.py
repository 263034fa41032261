"""Training augmentation with albumentations: flips, 90-degree rotations, colour jitter, rescaling.

Boxes are not transformed here: the dataset recomputes them from the transformed masks,
which keeps them tight after rotations and consistent with the masks.
"""

from __future__ import annotations

import albumentations as A
import numpy as np

from rsiseg.config import DataConfig


def build_train_transforms(cfg: DataConfig, bands: int) -> A.Compose | None:
    """Albumentations pipeline for ``float32 [H, W, C]`` images in [0, 1] with a list of masks.

    Returns None when every augmentation is switched off.
    """
    ops: list[A.BasicTransform] = []
    if cfg.max_size:
        ops.append(A.LongestMaxSize(max_size=cfg.max_size, p=1.0))
    low, high = cfg.scale_range
    if (low, high) != (1.0, 1.0):
        ops.append(A.RandomScale(scale_limit=(low - 1.0, high - 1.0), p=1.0))
    if cfg.hflip > 0:
        ops.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        ops.append(A.VerticalFlip(p=cfg.vflip))
    if cfg.rot90 > 0:
        ops.append(A.RandomRotate90(p=cfg.rot90))
    if cfg.color_jitter > 0:
        s = cfg.color_jitter
        if bands == 3:
            ops.append(A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4), p=0.8))
        else:  # ColorJitter is defined for RGB only; brightness/contrast work for any band count
            ops.append(A.RandomBrightnessContrast(brightness_limit=s, contrast_limit=s, p=0.8))
    if not ops:
        return None
    return A.Compose(ops, seed=0)


def apply_transforms(
    transforms: A.Compose, image: np.ndarray, masks: list[np.ndarray], seed: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Apply ``transforms`` with a per-sample seed, so runs and resumed runs see the same draws.

    Args:
        image: ``float32 [H, W, C]`` in [0, 1].
        masks: N arrays ``uint8 [H, W]``.
        seed: derived from (experiment seed, epoch, sample index) by the caller.
    """
    transforms.set_random_seed(seed)
    out = transforms(image=image, masks=masks) if masks else transforms(image=image)
    image = np.clip(out["image"], 0.0, 1.0).astype(np.float32, copy=False)
    return image, list(out["masks"]) if masks else []
