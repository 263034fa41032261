"""EfficientNet-B0 (timm) with CBAM after C2-C5, and an FPN with CBAM on every output level.

C2-C4 are the outputs of EfficientNet stages 2, 3 and 5 (24, 40 and 112 channels at strides 4,
8 and 16). C5 is the 1280-channel output of the final 1x1 head convolution at stride 32, as in
torchvision's ``efficientnet_b0().features``: that layout is what gives the report's 24.3 M
parameters for the whole model (the 320-channel stage output of timm's ``features_only`` would
give 23.5 M). ``model.attention.c5_head_conv: false`` takes the 320-channel stage output instead.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import timm
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from rsiseg.config import ModelConfig
from rsiseg.models.backbones.weights import adapt_stem, load_backbone_checkpoint
from rsiseg.models.layers.cbam import CBAM

log = logging.getLogger(__name__)

# Indices into timm's ``blocks`` whose outputs are C2, C3 and C4 (C5 follows the last block).
C2_C4_BLOCKS = (1, 2, 4)
# Parameter name prefixes of the five stages, in the order they unfreeze (``model.trainable_layers``).
STAGES = (("blocks.5", "blocks.6", "conv_head", "bn2"), ("blocks.3", "blocks.4"), ("blocks.2",), ("blocks.1",),
          ("conv_stem", "bn1", "blocks.0"))


class EfficientNetCBAM(nn.Module):
    """EfficientNet-B0 returning ``{"0": C2, "1": C3, "2": C4, "3": C5}``, each through its own CBAM.

    Args:
        net: a timm ``efficientnet_b0`` (``num_classes=0``); its classifier is never used.
        c5_head_conv: C5 is the 1280-channel head convolution (True) or the last stage's output.
        reduction, kernel_size: CBAM options.

    ``[B, C, H, W]`` -> maps of ``channels`` channels at strides 4, 8, 16, 32.
    """

    def __init__(self, net: nn.Module, *, c5_head_conv: bool = True, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.net = net
        self.c5_head_conv = c5_head_conv
        stage_channels = [net.blocks[i][-1].conv_pwl.out_channels for i in C2_C4_BLOCKS]
        c5 = net.conv_head.out_channels if c5_head_conv else net.blocks[-1][-1].conv_pwl.out_channels
        self.channels = [*stage_channels, c5]
        self.cbam = nn.ModuleList(CBAM(c, reduction, kernel_size) for c in self.channels)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.net.bn1(self.net.conv_stem(x))
        features = []
        for i, block in enumerate(self.net.blocks):
            x = block(x)
            if i in C2_C4_BLOCKS:
                features.append(x)
        features.append(self.net.bn2(self.net.conv_head(x)) if self.c5_head_conv else x)
        return OrderedDict((str(i), attend(f)) for i, (f, attend) in enumerate(zip(features, self.cbam)))


class AttentionFPN(nn.Module):
    """torchvision's FPN, a CBAM block on each of P2-P5, and P6 max-pooled from the attended P5.

    ``{"0": C2, ..., "3": C5}`` -> ``{"0": P2, ..., "3": P5, "pool": P6}``, ``out_channels`` each.
    """

    def __init__(self, in_channels: list[int], out_channels: int, *, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels)
        self.attention = nn.ModuleList(CBAM(out_channels, reduction, kernel_size) for _ in in_channels)

    def forward(self, features: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        levels = self.fpn(features)
        out = OrderedDict((name, attend(level)) for (name, level), attend in zip(levels.items(), self.attention))
        out["pool"] = F.max_pool2d(out[next(reversed(out))], kernel_size=1, stride=2)
        return out


class EfficientNetCBAMFPN(nn.Module):
    """Body and attention FPN: ``[B, C, H, W]`` -> ``{"0": P2, ..., "3": P5, "pool": P6}`` with ``out_channels``."""

    def __init__(self, body: EfficientNetCBAM, fpn: AttentionFPN, out_channels: int) -> None:
        super().__init__()
        self.body, self.fpn, self.out_channels = body, fpn, out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


def build_efficientnet_cbam_fpn(cfg: ModelConfig) -> EfficientNetCBAMFPN:
    """The backbone of ``maskrcnn_effb0_cbam`` from ``cfg`` (weights, bands, norm, frozen stages, CBAM options).

    ``pretrained: imagenet`` takes timm's download; ``backbone_checkpoint`` a local timm
    ``efficientnet_b0`` state dict (``classifier.*`` ignored). Norms: ``bn`` or ``frozen_bn``.
    """
    if cfg.norm not in ("bn", "frozen_bn"):
        raise ValueError(f"model.norm must be bn or frozen_bn for an EfficientNet backbone, got {cfg.norm!r}")
    options = cfg.attention
    net = timm.create_model("efficientnet_b0", pretrained=cfg.pretrained == "imagenet", num_classes=0,
                            global_pool="", drop_path_rate=options.backbone_drop_path)
    if cfg.backbone_checkpoint:
        load_backbone_checkpoint(net, cfg.backbone_checkpoint, ignore_prefixes=("classifier.",))
    if cfg.in_channels != 3:
        net.conv_stem = adapt_stem(net.conv_stem, cfg.in_channels)
    if cfg.norm == "frozen_bn":
        net = freeze_batch_norm_2d(net)
    freeze_stages(net, cfg.trainable_layers)
    body = EfficientNetCBAM(net, c5_head_conv=options.c5_head_conv, reduction=options.cbam_reduction,
                            kernel_size=options.cbam_kernel)
    fpn = AttentionFPN(body.channels, cfg.fpn_channels, reduction=options.cbam_reduction,
                       kernel_size=options.cbam_kernel)
    return EfficientNetCBAMFPN(body, fpn, cfg.fpn_channels)


def freeze_stages(net: nn.Module, trainable_layers: int) -> None:
    """Let the last ``trainable_layers`` of the five stages (C5 first, the stem last) train."""
    trainable = tuple(prefix for stage in STAGES[:trainable_layers] for prefix in stage)
    for name, param in net.named_parameters():
        if not name.startswith(trainable):
            param.requires_grad_(False)
