"""Model builders by name: a plain dict, no decorators, no import side effects.

Each entry names the builder and the tasks (see :mod:`rsiseg.tasks`) the model serves; a config's
``task`` must be one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from rsiseg.config import ModelConfig
from rsiseg.models import cascade, mask_rcnn
from rsiseg.models.attention_rcnn import model as attention_rcnn
from rsiseg.models.prompt import model as prompt
from rsiseg.models.sam import build as sam
from rsiseg.models.semantic import seg_resnet
from rsiseg.models.yolact import model as yolact


class ModelEntry(NamedTuple):
    build: Callable[[ModelConfig], nn.Module]
    tasks: tuple[str, ...]


MODELS: dict[str, ModelEntry] = {
    "maskrcnn_r18_fpn": ModelEntry(mask_rcnn.build_maskrcnn_r18_fpn, ("instance",)),
    "maskrcnn_r34_fpn": ModelEntry(mask_rcnn.build_maskrcnn_r34_fpn, ("instance",)),
    "maskrcnn_r50_fpn": ModelEntry(mask_rcnn.build_maskrcnn_r50_fpn, ("instance",)),
    "maskrcnn_r101_fpn": ModelEntry(mask_rcnn.build_maskrcnn_r101_fpn, ("instance",)),
    "maskrcnn_effb0_cbam": ModelEntry(attention_rcnn.build_maskrcnn_effb0_cbam, ("instance",)),
    "cascade_maskrcnn_r18_fpn": ModelEntry(cascade.build_cascade_maskrcnn_r18_fpn, ("instance",)),
    "cascade_maskrcnn_r50_fpn": ModelEntry(cascade.build_cascade_maskrcnn_r50_fpn, ("instance",)),
    "maskrcnn_r18_prompt": ModelEntry(prompt.build_maskrcnn_r18_prompt, ("instance",)),
    "maskrcnn_r50_prompt": ModelEntry(prompt.build_maskrcnn_r50_prompt, ("instance",)),
    "cascade_maskrcnn_r18_prompt": ModelEntry(prompt.build_cascade_maskrcnn_r18_prompt, ("instance",)),
    "cascade_maskrcnn_r50_prompt": ModelEntry(prompt.build_cascade_maskrcnn_r50_prompt, ("instance",)),
    "yolact_r18": ModelEntry(yolact.build_yolact_r18, ("instance",)),
    "yolact_r50": ModelEntry(yolact.build_yolact_r50, ("instance",)),
    "seg_resnet18": ModelEntry(seg_resnet.build_seg_resnet18, ("semantic",)),
    "pointsam_tiny": ModelEntry(sam.build_pointsam_tiny, ("prompted",)),
    "pointsam_vit_b": ModelEntry(sam.build_pointsam_vit_b, ("prompted",)),
    "pointsam_vit_l": ModelEntry(sam.build_pointsam_vit_l, ("prompted",)),
    "pointsam_vit_h": ModelEntry(sam.build_pointsam_vit_h, ("prompted",)),
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model named by ``cfg.name``.

    Raises:
        ValueError: unknown name, listing the registered ones.
    """
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model.name {cfg.name!r}; registered: {', '.join(sorted(MODELS))}")
    return MODELS[cfg.name].build(cfg)
