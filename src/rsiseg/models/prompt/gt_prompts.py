"""Jittered ground-truth boxes as box prompts in training (the promptable mode of Insight Any Instance).

At inference a user's box goes through the mask branch and the prompt modules as a proposal
would. To train that path on boxes that look like a user's (close to, but not exactly, the
instance's box), a random share of each image's ground-truth boxes is jittered by a few percent
of their side and added to the mask branch's RoIs, each matched to its own instance.
"""

from __future__ import annotations

import torch
from torch import Tensor


def jitter_boxes(boxes: Tensor, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """``boxes`` ``[N, 4]`` xyxy with each edge moved by up to ``fraction`` of the box's width (x) or height (y).

    Boxes stay at least 1 px wide and tall.
    """
    if len(boxes) == 0 or fraction == 0:
        return boxes.clone()
    sides = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = torch.rand(boxes.shape, generator=generator, device="cpu").to(boxes) * 2 - 1
    moved = boxes + noise * fraction * sides
    low = torch.minimum(moved[:, :2], moved[:, 2:] - 1)
    return torch.cat([low, torch.maximum(moved[:, 2:], low + 1)], dim=1)


class JitteredGtPrompts:
    """The RoI heads' ``mask_rois`` hook: adds ``ratio`` of each image's instances as jittered boxes.

    Called with the positive RoIs per image ``[P_i, 4]``, their matched instance ``[P_i]`` and the
    targets (``boxes`` ``[N_i, 4]`` in network-input pixels); returns them with
    ``round(ratio * N_i)`` (at least 1 when ``N_i > 0``) prompt boxes appended to each image.
    Draws from torch's global generator, which the trainer seeds and checkpoints.
    """

    def __init__(self, ratio: float, jitter: float) -> None:
        self.ratio = ratio
        self.jitter = jitter

    def __call__(self, rois: list[Tensor], matched: list[Tensor], targets: list[dict[str, Tensor]],
                 ) -> tuple[list[Tensor], list[Tensor]]:
        out_rois, out_matched = [], []
        for boxes, idx, target in zip(rois, matched, targets):
            count = len(target["boxes"])
            picked = torch.randperm(count)[: max(1, round(self.ratio * count))] if count else torch.zeros(0, dtype=torch.int64)
            picked = picked.to(idx.device)
            out_rois.append(torch.cat([boxes, jitter_boxes(target["boxes"][picked], self.jitter)]))
            out_matched.append(torch.cat([idx, picked]))
        return out_rois, out_matched
