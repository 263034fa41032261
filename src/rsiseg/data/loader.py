"""What every task's data loading shares: the worker count, the list collate and the image tensor layout."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch


def resolve_num_workers(requested: int | None) -> int:
    """Loader worker processes: ``requested``, or with None the CPU cores this process may use (at most 8)."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"data.num_workers must be >= 0 or null (auto), got {requested}")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 8)


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Keep images and targets as lists: detection images differ in size, and targets hold non-tensors."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """An ``[H, W, C]`` array (float32 in [0, 1] for the models) as a contiguous ``[C, H, W]`` tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
