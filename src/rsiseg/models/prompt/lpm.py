"""The local prompt module (LPM) of "Insight Any Instance" (PROMPT).

Each box is cropped from the original image (not a feature map, so small objects keep their pixels)
and resized to ``crop_size``. Two branches turn the crop into overlapping patch tokens: one on the
pixels, one on the pixels after a learnable global frequency filter. An MLP mixes the two token sets.
The tokens are later added to the box's RoI features.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rsiseg.models.layers.fourier import FourierFilter
from rsiseg.models.prompt.tokens import PatchTokens, crop_boxes


class LocalPromptModule(nn.Module):
    """Per-box prompt tokens from image crops: pixel and Fourier branches, MLP-mixed.

    All boxes of the batch go through at once (one ``roi_align`` call, no loop over boxes).

    Args:
        in_channels: C, the band count of the images.
        dim: D, the token width.
        crop_size: side S of the box crops (28 in the paper).
        patch_kernel: size of the overlapping patches; must exceed ``patch_stride``.
        patch_stride: stride of the patches.

    Attributes:
        grid: tokens per side, 7 for the defaults 28/7/4 (padding ``patch_kernel // 2``); T = grid ** 2.
    """

    def __init__(
        self, in_channels: int, dim: int = 64, crop_size: int = 28, patch_kernel: int = 7, patch_stride: int = 4
    ) -> None:
        super().__init__()
        if patch_kernel <= patch_stride:
            raise ValueError(
                f"model.prompt.patch_kernel ({patch_kernel}) must be larger than model.prompt.patch_stride "
                f"({patch_stride}): the patch partition must overlap"
            )
        self.crop_size = crop_size
        padding = patch_kernel // 2
        self.spatial_tokens = PatchTokens(in_channels, dim, patch_kernel, patch_stride, padding)
        self.fourier = FourierFilter(in_channels, crop_size, crop_size)
        self.fourier_tokens = PatchTokens(in_channels, dim, patch_kernel, patch_stride, padding)
        self.mix = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.grid = self.spatial_tokens.grid(crop_size)

    def forward(self, images: Tensor, boxes: list[Tensor]) -> Tensor:
        """Prompt tokens of every box.

        Args:
            images: ``[B, C, H, W]`` float, the images the boxes are in (the prompt context's, at original resolution).
            boxes: B tensors ``[K_i, 4]``, xyxy in pixels of ``images``.

        Returns:
            ``[K, T, D]``, ``K = sum K_i`` (image 0's boxes first), ``T = grid ** 2``; ``[0, T, D]`` for no boxes.
        """
        crops = crop_boxes(images, boxes, self.crop_size)
        tokens = torch.cat([self.spatial_tokens(crops), self.fourier_tokens(self.fourier(crops))], dim=-1)
        return self.norm(self.mix(tokens))
