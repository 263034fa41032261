"""Chunked anchor/proposal matching gives exactly torchvision's Matcher on the full IoU matrix."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from rsiseg.models.layers import box_matching
from rsiseg.models.layers.box_matching import BoxPairs, LocalMatcher


def anchors(size: int = 128) -> torch.Tensor:
    generator = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 5)
    features = [torch.zeros(1, 1, size // s, size // s) for s in (4, 8, 16, 32, 64)]
    return generator(ImageList(torch.zeros(1, 3, size, size), [(size, size)]), features)[0]


def instances(n: int, size: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * (size - 34)
    wh = torch.rand(n, 2, generator=g) * 30 + 2
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize(("high", "low", "allow"), [(0.7, 0.3, True), (0.5, 0.5, False)])
@pytest.mark.parametrize("n", [1, 30, 150])
def test_same_matches_as_torchvision(high: float, low: float, allow: bool, n: int, monkeypatch) -> None:
    boxes = torch.cat([anchors(), instances(50, seed=9)])  # anchors, plus proposals of free sizes
    gt = instances(n)
    expected = Matcher(high, low, allow)(box_iou(gt, boxes))
    assert torch.equal(LocalMatcher(high, low, allow)(BoxPairs(gt, boxes)), expected)  # the dense path
    monkeypatch.setattr(box_matching, "_DENSE_ELEMENTS", 0)
    assert torch.equal(LocalMatcher(high, low, allow)(BoxPairs(gt, boxes)), expected)
    # Tiny chunks: many chunks, the "many instances nearby" split, and ties across chunks.
    monkeypatch.setattr(box_matching, "_CHUNK_BOXES", 257)
    monkeypatch.setattr(box_matching, "_CHUNK_ELEMENTS", 3000)
    assert torch.equal(LocalMatcher(high, low, allow)(BoxPairs(gt, boxes)), expected)


def test_empty_inputs_raise_like_torchvision() -> None:
    with pytest.raises(ValueError, match="No ground-truth boxes"):
        LocalMatcher(0.7, 0.3)(BoxPairs(torch.zeros(0, 4), anchors()))
    with pytest.raises(ValueError, match="No proposal boxes"):
        LocalMatcher(0.7, 0.3)(BoxPairs(instances(3), torch.zeros(0, 4)))
