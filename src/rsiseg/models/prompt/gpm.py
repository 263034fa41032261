"""The global-to-local prompt module (GPM) of "Insight Any Instance" (PROMPT).

Global tokens summarise the whole (resized) image; each box's local tokens, from a crop of the
original image, attend to themselves and then to the global tokens of their own image
(``softmax(L G^T / sqrt(d)) G``), so a box sees its context. Global tokens can be computed once per image
(``encode_global``) and reused for any number of boxes, e.g. for interactive prompting.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rsiseg.models.prompt.tokens import PatchTokens, crop_boxes


class TransformerMLP(nn.Sequential):
    """``Linear(D, ratio * D) -> GELU -> Linear(ratio * D, D)`` on tokens ``[..., D]``."""

    def __init__(self, dim: int, ratio: int = 4) -> None:
        super().__init__(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x + MHA(norm(x))``, then ``x + MLP(norm(x))``; tokens ``[N, T, D]`` kept."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = TransformerMLP(dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm_attn(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


class LocalGlobalBlock(nn.Module):
    """Local self-attention, cross-attention to the global tokens, MLP; each pre-norm with a residual.

    Args:
        dim: D.
        heads: attention heads of both attentions.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = TransformerMLP(dim)

    def forward(self, local: Tensor, global_: Tensor) -> Tensor:
        """``local`` ``[K, T, D]``, ``global_`` ``[K, G, D]`` (each box's own image's tokens) -> ``[K, T, D]``."""
        h = self.norm_self(local)
        local = local + self.self_attn(h, h, h, need_weights=False)[0]
        local = local + self.cross_attn(self.norm_cross(local), global_, global_, need_weights=False)[0]
        return local + self.mlp(self.norm_mlp(local))


class GlobalToLocalPromptModule(nn.Module):
    """Per-box prompt tokens: local crop tokens that attend to their image's global tokens.

    The cost grows with the number of boxes (each box costs ``T`` local tokens against ``G`` global ones),
    not with the background area: the image enters only once, resized to ``global_size``.

    Args:
        in_channels: C, the band count of the images.
        dim: D, the token width; must be divisible by ``heads``.
        global_size: side the whole image is resized to for the global tokens; a multiple of ``global_patch``.
        global_patch: side of the non-overlapping global patches; ``G = (global_size // global_patch) ** 2``.
        local_size: side of the box crops (28 in the paper).
        patch_kernel: size of the overlapping local patches; must exceed ``patch_stride``.
        patch_stride: stride of the local patches.
        heads: attention heads.
        blocks: repetitions of local self-attention -> cross-attention -> MLP.

    Attributes:
        grid: local tokens per side, 7 for the defaults 28/7/4 (padding ``patch_kernel // 2``); T = grid ** 2.
        global_grid: global tokens per side, 14 for the defaults 224/16.
    """

    def __init__(
        self,
        in_channels: int,
        dim: int = 64,
        global_size: int = 224,
        global_patch: int = 16,
        local_size: int = 28,
        patch_kernel: int = 7,
        patch_stride: int = 4,
        heads: int = 4,
        blocks: int = 2,
    ) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"model.prompt.dim ({dim}) must be divisible by model.prompt.heads ({heads})")
        if global_size % global_patch != 0:
            raise ValueError(
                f"model.prompt.global_size ({global_size}) must be a multiple of model.prompt.global_patch "
                f"({global_patch})"
            )
        if patch_kernel <= patch_stride:
            raise ValueError(
                f"model.prompt.patch_kernel ({patch_kernel}) must be larger than model.prompt.patch_stride "
                f"({patch_stride}): the patch partition must overlap"
            )
        self.global_size = global_size
        self.local_size = local_size
        self.global_tokens = PatchTokens(in_channels, dim, global_patch, global_patch)
        self.global_grid = self.global_tokens.grid(global_size)
        self.global_pos = nn.Parameter(torch.zeros(1, self.global_grid**2, dim))
        self.global_block = SelfAttentionBlock(dim, heads)
        self.local_tokens = PatchTokens(in_channels, dim, patch_kernel, patch_stride, patch_kernel // 2)
        self.grid = self.local_tokens.grid(local_size)
        self.local_pos = nn.Parameter(torch.zeros(1, self.grid**2, dim))
        self.blocks = nn.ModuleList(LocalGlobalBlock(dim, heads) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.global_pos, std=0.02)
        nn.init.trunc_normal_(self.local_pos, std=0.02)

    def encode_global(self, images: Tensor, image_sizes: list[tuple[int, int]] | None = None) -> Tensor:
        """Global tokens of each image.

        Args:
            images: ``[B, C, H, W]`` float, any H and W.
            image_sizes: each image's (h, w) inside a zero-padded ``images``; None: the whole of each.
                Only that part is resized (antialiased) to ``global_size`` x ``global_size``, so an
                image's tokens do not depend on the others in its batch.

        Returns:
            ``[B, G, D]``, ``G = global_grid ** 2``.
        """
        sizes = image_sizes or [tuple(images.shape[-2:])] * len(images)
        side = (self.global_size, self.global_size)
        resized = torch.cat([
            nn.functional.interpolate(image[None, :, :h, :w], size=side, mode="bilinear", align_corners=False,
                                      antialias=True)
            for image, (h, w) in zip(images, sizes)
        ]) if len(images) else images.new_zeros(0, images.shape[1], *side)
        return self.global_block(self.global_tokens(resized) + self.global_pos)

    def forward(self, images: Tensor, boxes: list[Tensor], global_tokens: Tensor | None = None) -> Tensor:
        """Prompt tokens of every box.

        Args:
            images: ``[B, C, H, W]`` float, the images the boxes are in (the prompt context's, at original resolution).
            boxes: B tensors ``[K_i, 4]``, xyxy in pixels of ``images``.
            global_tokens: ``[B, G, D]`` from ``encode_global``; computed here when None.

        Returns:
            ``[K, T, D]``, ``K = sum K_i`` (image 0's boxes first), ``T = grid ** 2``; ``[0, T, D]`` for no boxes.
        """
        local = self.local_tokens(crop_boxes(images, boxes, self.local_size)) + self.local_pos
        if global_tokens is None:
            global_tokens = self.encode_global(images)
        counts = torch.tensor([len(b) for b in boxes], device=images.device)
        image_index = torch.repeat_interleave(torch.arange(len(boxes), device=images.device), counts)
        context = global_tokens[image_index]
        for block in self.blocks:
            local = block(local, context)
        return self.norm(local)
