"""Prompt fusion: the local and global-to-local prompts of each box, added to its RoI features.

:class:`PromptFusion` is the RoI heads' ``prompter`` (see
:class:`~rsiseg.models.layers.roi_heads.RoIPrompter`). Per batch, :meth:`PromptFusion.encode`
keeps what does not depend on the boxes: the normalised images at their original resolution (before
the detector's resize, which shrinks small objects), each image's scale from network input
to original pixels, and the GPM's global tokens. Per set of boxes (in network-input pixels, as the
RoI heads hold them), the enabled modules give ``[K, T, dim]`` tokens on a ``g x g`` grid,
which are concatenated, laid out as a ``[K, n dim, g, g]`` map, projected by a 1x1 conv to the
RoI features' channels, resized to the RoI size (14x14 for the mask head, 7x7 for the box head)
and added (``fusion: add``), or added through a learned tanh gate that starts at 0
(``fusion: gated``: the model starts as its baseline and opens the gate as it learns).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsiseg.config import PromptConfig
from rsiseg.models.prompt.gpm import GlobalToLocalPromptModule
from rsiseg.models.prompt.lpm import LocalPromptModule


class PromptContext(NamedTuple):
    """What the prompts need of a batch: ``images`` ``[B, C, H, W]``, the normalised images at their
    original resolution (zero-padded to the largest); ``scales`` ``[B, 4]``, per image the factors
    (x, y, x, y) from network-input to original pixels; the GPM's ``global_tokens`` ``[B, G, dim]``
    (None without a GPM)."""

    images: Tensor
    scales: Tensor
    global_tokens: Tensor | None


class PromptFusion(nn.Module):
    """LPM and/or GPM prompts added to the pooled RoI features of the mask head (and the box head).

    Args:
        cfg: ``model.prompt``; at least one of ``lpm``/``gpm`` must be on.
        in_channels: image bands.
        roi_channels: channels C of the pooled RoI features (the FPN width).
    """

    def __init__(self, cfg: PromptConfig, in_channels: int, roi_channels: int) -> None:
        super().__init__()
        if not (cfg.lpm or cfg.gpm):
            raise ValueError("PromptFusion needs model.prompt.lpm or model.prompt.gpm")
        tokens = {"dim": cfg.dim, "patch_kernel": cfg.patch_kernel, "patch_stride": cfg.patch_stride}
        self.lpm = LocalPromptModule(in_channels, crop_size=cfg.crop_size, **tokens) if cfg.lpm else None
        self.gpm = GlobalToLocalPromptModule(
            in_channels, global_size=cfg.global_size, global_patch=cfg.global_patch, local_size=cfg.crop_size,
            heads=cfg.heads, blocks=cfg.blocks, **tokens,
        ) if cfg.gpm else None
        width = cfg.dim * (int(cfg.lpm) + int(cfg.gpm))
        kinds = ("mask", "box") if cfg.fuse == "mask_box" else ("mask",)
        self.project = nn.ModuleDict({kind: nn.Conv2d(width, roi_channels, 1) for kind in kinds})
        self.gate = nn.ParameterDict({kind: nn.Parameter(torch.zeros(1)) for kind in kinds}) \
            if cfg.fusion == "gated" else None

    def encode(self, images: Tensor, original_sizes: list[tuple[int, int]],
               image_sizes: list[tuple[int, int]]) -> PromptContext:
        """The per-batch part.

        Args:
            images: ``[B, C, H, W]`` normalised images at their original resolution, zero-padded.
            original_sizes: each image's (h, w) in ``images``.
            image_sizes: each image's (h, w) at network input, where the RoI heads' boxes live.
        """
        scales = torch.tensor([[w / nw, h / nh, w / nw, h / nh] for (h, w), (nh, nw) in zip(original_sizes, image_sizes)],
                              dtype=torch.float32, device=images.device)
        global_tokens = self.gpm.encode_global(images, original_sizes) if self.gpm is not None else None
        return PromptContext(images, scales, global_tokens)

    def prompt_map(self, boxes: list[Tensor], context: PromptContext) -> Tensor:
        """``[K, n dim, g, g]``: the enabled modules' tokens of every box (per image ``[K_i, 4]`` in
        network-input pixels; each is cropped from its image at original resolution)."""
        boxes = [b.float() * scale for b, scale in zip(boxes, context.scales)]
        parts = []
        if self.lpm is not None:
            parts.append(self.lpm(context.images, boxes))
        if self.gpm is not None:
            parts.append(self.gpm(context.images, boxes, context.global_tokens))
        tokens = torch.cat([part.float() for part in parts], dim=-1)  # under autocast the modules may differ in dtype
        side = int(round(tokens.shape[1] ** 0.5))
        return tokens.transpose(1, 2).reshape(len(tokens), -1, side, side)

    def forward(self, kind: str, features: Tensor, boxes: list[Tensor], context: PromptContext) -> Tensor:
        """``features`` ``[K, C, S, S]`` plus the projected prompts when ``kind`` is fused, else unchanged."""
        if kind not in self.project or len(features) == 0:
            return features
        prompts = self.project[kind](self.prompt_map(boxes, context))
        prompts = F.interpolate(prompts, size=features.shape[-2:], mode="bilinear", align_corners=False)
        if self.gate is not None:
            prompts = torch.tanh(self.gate[kind]) * prompts
        return features + prompts.to(features.dtype)
