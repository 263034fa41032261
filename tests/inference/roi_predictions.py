"""Random Mask R-CNN style predictions for the export, overlay and paste tests."""

from __future__ import annotations

import torch


def roi_prediction(n: int, height: int, width: int, *, classes: int = 2, max_half: float = 15.0,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` detections with 28 x 28 box-relative probabilities; boxes overlap, some overhang the image."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand((n, 2), generator=gen) * torch.tensor([width, height])
    half = torch.rand((n, 2), generator=gen) * max_half + 0.3
    return {
        "boxes": torch.cat([centre - half, centre + half], dim=1),
        "labels": 1 + torch.randint(0, classes, (n,), generator=gen),
        "scores": torch.rand(n, generator=gen),
        "roi_masks": torch.rand((n, 28, 28), generator=gen),
        "image_size": torch.tensor([height, width]),
    }
