"""Model builders by name: a plain dict, no decorators, no import side effects."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from rsiseg.config import ModelConfig
from rsiseg.models import mask_rcnn

MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "maskrcnn_r18_fpn": mask_rcnn.build_maskrcnn_r18_fpn,
    "maskrcnn_r34_fpn": mask_rcnn.build_maskrcnn_r34_fpn,
    "maskrcnn_r50_fpn": mask_rcnn.build_maskrcnn_r50_fpn,
    "maskrcnn_r101_fpn": mask_rcnn.build_maskrcnn_r101_fpn,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model named by ``cfg.name``.

    Raises:
        ValueError: unknown name, listing the registered ones.
    """
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model.name {cfg.name!r}; registered: {', '.join(sorted(MODELS))}")
    return MODELS[cfg.name](cfg)
