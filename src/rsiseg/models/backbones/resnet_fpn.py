"""ResNet + FPN backbone (P2-P5 plus a max-pooled P6) from torchvision blocks.

Supports any band count (the stem is rebuilt for ``in_channels != 3``, and ImageNet weights
are adapted by averaging the RGB filters), three normalisations, and local weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from rsiseg.models.backbones.weights import adapt_stem, load_backbone_checkpoint

RESNETS: dict[str, tuple[Callable[..., resnet.ResNet], object]] = {
    "resnet18": (resnet.resnet18, resnet.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (resnet.resnet34, resnet.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (resnet.resnet50, resnet.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (resnet.resnet101, resnet.ResNet101_Weights.IMAGENET1K_V1),
}

NORMS: dict[str, Callable[[int], nn.Module]] = {
    "frozen_bn": FrozenBatchNorm2d,
    "bn": nn.BatchNorm2d,
    "gn": lambda channels: nn.GroupNorm(min(32, channels // 4), channels),
}

STAGES = ["layer4", "layer3", "layer2", "layer1", "conv1"]  # in the order they unfreeze


def build_resnet_fpn(depth_name: str, *, fpn_channels: int = 256, first_stage: int = 1,
                     extra_blocks: ExtraFPNBlock | None = None, **body_options: Any) -> BackboneWithFPN:
    """Build a ResNet-FPN: by default ``{"0": P2, "1": P3, "2": P4, "3": P5, "pool": P6}``.

    Args:
        depth_name: one of ``RESNETS`` (``resnet18`` ... ``resnet101``).
        fpn_channels: FPN output channels.
        first_stage: the first ResNet stage (``layer1`` = C2 ... ``layer4`` = C5) that feeds the FPN;
            2 gives P3-P5 (YOLACT, RetinaNet).
        extra_blocks: the levels above P5 (default: torchvision's max-pooled P6; YOLACT passes
            ``LastLevelP6P7``).
        body_options: ``in_channels``, ``pretrained``, ``checkpoint``, ``norm``, ``trainable_layers``
            of :func:`build_resnet_body`.

    Returns:
        A module mapping ``[B, C, H, W]`` to feature maps of ``fpn_channels`` channels (by default at
        strides 4, 8, 16, 32 and 64), keys ``"0"``, ``"1"``, ... from the first stage, with ``out_channels`` set.
    """
    if not 1 <= first_stage <= 4:
        raise ValueError(f"first_stage must be in 1..4, got {first_stage}")
    body = build_resnet_body(depth_name, **body_options)
    stages = [f"layer{i}" for i in range(first_stage, 5)]
    in_channels_list = [block_out_channels(getattr(body, stage)[-1]) for stage in stages]
    return BackboneWithFPN(
        body,
        return_layers={stage: str(i) for i, stage in enumerate(stages)},
        in_channels_list=in_channels_list,
        out_channels=fpn_channels,
        extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool(),
    )


def resnet_fpn_from_config(cfg: Any, depth_name: str, **fpn_options: Any) -> BackboneWithFPN:
    """:func:`build_resnet_fpn` with the backbone fields of a :class:`~rsiseg.config.ModelConfig`;
    ``fpn_options``: ``first_stage`` and ``extra_blocks``."""
    return build_resnet_fpn(
        depth_name, in_channels=cfg.in_channels, pretrained=cfg.pretrained, checkpoint=cfg.backbone_checkpoint,
        norm=cfg.norm, trainable_layers=cfg.trainable_layers, fpn_channels=cfg.fpn_channels, **fpn_options,
    )


def build_resnet_body(
    depth_name: str,
    *,
    in_channels: int = 3,
    pretrained: str = "none",
    checkpoint: str | None = None,
    norm: str = "bn",
    trainable_layers: int = 5,
) -> resnet.ResNet:
    """A torchvision ResNet with its weights, band count, normalisation and frozen stages set.

    Every family with a ResNet encoder builds it here.

    Args:
        depth_name: one of ``RESNETS`` (``resnet18`` ... ``resnet101``).
        in_channels: image bands C.
        pretrained: ``imagenet`` (torchvision download) or ``none``.
        checkpoint: local ResNet state dict (torchvision key names; ``fc.*`` ignored).
        norm: ``frozen_bn``, ``bn`` or ``gn``.
        trainable_layers: how many stages, from ``layer4`` down to ``conv1``, train (0-5).
    """
    if depth_name not in RESNETS:
        raise ValueError(f"unknown ResNet {depth_name!r}; choose from {sorted(RESNETS)}")
    if norm not in NORMS:
        raise ValueError(f"model.norm must be one of {sorted(NORMS)}, got {norm!r}")
    if pretrained not in ("none", "imagenet"):
        raise ValueError(f"model.pretrained must be 'imagenet' or 'none', got {pretrained!r}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"model.trainable_layers must be in 0..5, got {trainable_layers}")
    factory, weights = RESNETS[depth_name]
    body = factory(weights=weights if pretrained == "imagenet" else None, norm_layer=NORMS[norm])
    if checkpoint:
        load_backbone_checkpoint(body, checkpoint, ignore_prefixes=("fc.",))
    if in_channels != 3:
        body.conv1 = adapt_stem(body.conv1, in_channels)
    freeze_stages(body, trainable_layers)
    return body


def freeze_stages(body: nn.Module, trainable_layers: int) -> None:
    trainable = STAGES[:trainable_layers]
    if trainable_layers == 5:
        trainable = [*trainable, "bn1"]
    for name, param in body.named_parameters():
        if all(not name.startswith(stage) for stage in trainable):
            param.requires_grad_(False)


def block_out_channels(block: nn.Module) -> int:
    last_conv = block.conv3 if hasattr(block, "conv3") else block.conv2
    return last_conv.out_channels


