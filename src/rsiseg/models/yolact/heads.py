"""YOLACT's heads: the protonet, the prediction head shared across FPN levels, the semantic head.

Shapes use B images, C = ``fpn_channels``, K classes (background excluded), A anchors per location
and k prototypes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProtoNet(nn.Module):
    """Prototype masks from P3: three 3x3 convs, x2 upsampling, a 3x3 conv and a 1x1 conv to k maps.

    Every conv is followed by a ReLU, the last one included (YOLACT: non-negative prototypes).
    ``[B, C, H/8, W/8]`` (P3) -> ``[B, k, H/4, W/4]``: a quarter of the network input.
    """

    def __init__(self, channels: int, prototypes: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[layer for _ in range(3) for layer in (nn.Conv2d(channels, channels, 3, padding=1),
                                                                           nn.ReLU(inplace=True))])
        self.refine = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                    nn.Conv2d(channels, prototypes, 1), nn.ReLU(inplace=True))

    def forward(self, p3: Tensor) -> Tensor:
        x = F.interpolate(self.convs(p3), scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.refine(x)


class HeadOutputs(NamedTuple):
    """The prediction head's outputs over all levels, anchors in the anchor generator's order
    (level, then location row-major, then anchor): ``logits`` ``[B, N, K + 1]``, ``deltas``
    ``[B, N, 4]``, ``coefficients`` ``[B, N, k]`` in [-1, 1] (tanh), ``quality`` ``[B, N]`` logits of
    the predicted mask IoU (None without the quality branch)."""

    logits: Tensor
    deltas: Tensor
    coefficients: Tensor
    quality: Tensor | None


class PredictionHead(nn.Module):
    """One head shared across FPN levels: a 3x3 conv + ReLU, then 3x3 convs for the class logits, the
    box deltas, the k mask coefficients (tanh) and, with ``quality``, the mask-quality logit.

    Args:
        channels: C of every FPN level.
        hidden: width of the shared 3x3 conv.
        anchors: A, anchors per location.
        num_classes: K (background excluded).
        prototypes: k.
        quality: add the mask-quality branch (RELACT's optimized sorting).
    """

    def __init__(self, channels: int, hidden: int, anchors: int, num_classes: int, prototypes: int,
                 quality: bool = False) -> None:
        super().__init__()
        self.anchors, self.num_classes = anchors, num_classes
        self.upfeature = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(inplace=True))
        self.conf = nn.Conv2d(hidden, anchors * (num_classes + 1), 3, padding=1)
        self.box = nn.Conv2d(hidden, anchors * 4, 3, padding=1)
        self.coef = nn.Conv2d(hidden, anchors * prototypes, 3, padding=1)
        self.quality = nn.Conv2d(hidden, anchors, 3, padding=1) if quality else None

    def forward(self, levels: list[Tensor]) -> HeadOutputs:
        """``levels``: ``[B, C, H_l, W_l]`` per level -> :class:`HeadOutputs` over ``N = sum A H_l W_l``."""
        per_level = [self._level(x) for x in levels]
        logits, deltas, coefficients, quality = [None if parts[0] is None else torch.cat(parts, dim=1)
                                                 for parts in zip(*per_level)]
        return HeadOutputs(logits, deltas, torch.tanh(coefficients), None if quality is None else quality[..., 0])

    def _level(self, x: Tensor) -> tuple[Tensor | None, ...]:
        x = self.upfeature(x)
        return tuple(None if branch is None else _flatten(branch(x), self.anchors)
                     for branch in (self.conf, self.box, self.coef, self.quality))


def _flatten(x: Tensor, anchors: int) -> Tensor:
    """``[B, A * D, H, W]`` -> ``[B, H * W * A, D]`` (location-major, anchor-minor, as the anchors)."""
    batch, _, height, width = x.shape
    return x.view(batch, anchors, -1, height, width).permute(0, 3, 4, 1, 2).reshape(batch, height * width * anchors, -1)


class SemanticHead(nn.Module):
    """The auxiliary semantic head (training only): a 1x1 conv on P3, ``[B, C, h, w]`` -> logits ``[B, K, h, w]``."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, num_classes, 1)

    def forward(self, p3: Tensor) -> Tensor:
        return self.conv(p3)
