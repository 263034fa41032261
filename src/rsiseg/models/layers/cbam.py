"""CBAM: the Convolutional Block Attention Module (Woo et al., ECCV 2018).

Channel attention, then spatial attention, each a sigmoid gate multiplied into the features. The
block keeps the shape of its input, so it can follow any stage of a backbone or any FPN level.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ChannelAttention(nn.Module):
    """Gate ``[B, C, 1, 1]`` from a shared MLP over the average- and max-pooled features.

    Args:
        channels: C.
        reduction: the MLP's hidden width is ``max(C // reduction, 1)``.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, C, H, W]`` -> gate ``[B, C, 1, 1]`` in (0, 1)."""
        pooled_avg = x.mean(dim=(2, 3), keepdim=True)
        pooled_max = x.amax(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.mlp(pooled_avg) + self.mlp(pooled_max))


class SpatialAttention(nn.Module):
    """Gate ``[B, 1, H, W]`` from a ``k x k`` convolution over the channel mean and max."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"the spatial attention kernel must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, C, H, W]`` -> gate ``[B, 1, H, W]`` in (0, 1)."""
        stacked = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(stacked))


class CBAM(nn.Module):
    """Channel then spatial attention: ``y = x * Mc(x)``, ``out = y * Ms(y)``; shape ``[B, C, H, W]`` kept.

    Args:
        channels: C of the input.
        reduction: channel-MLP reduction (16 in the paper and the iSAID report).
        kernel_size: spatial-attention kernel (7 in the paper).
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.channel(x)
        return x * self.spatial(x)
