"""ResNet-18 encoder and a transposed-convolution decoder for (point-supervised) semantic segmentation.

The architecture of "Partial Cross Entropy Loss for Remote Sensing Image Segmentation with Point
Annotations": the ResNet-18 feature map at stride 32 is brought back to the input resolution by five
``ConvTranspose2d`` + BN + ReLU stages, then a 1x1 convolution gives the class logits. Optional
U-Net skips concatenate the encoder feature of the same stride before the next stage.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import ResNet

from rsiseg.config import ModelConfig
from rsiseg.data.class_weights import load_class_weights
from rsiseg.models.backbones.resnet_fpn import NORMS, block_out_channels, build_resnet_body
from rsiseg.models.semantic.partial_ce import partial_cross_entropy

STRIDE = 32  # the encoder's total downsampling; inputs are padded to a multiple of it


class ResNetEncoder(nn.Module):
    """A torchvision ResNet without its classifier, returning the feature of every stride.

    ``forward([B, C, H, W])`` gives ``[stem (s2), layer1 (s4), layer2 (s8), layer3 (s16), layer4 (s32)]``
    for ``H, W`` multiples of 32; :attr:`channels` lists their channel counts.
    """

    def __init__(self, body: ResNet) -> None:
        super().__init__()
        self.stem = nn.Sequential(body.conv1, body.bn1, body.relu)
        self.maxpool = body.maxpool
        self.layers = nn.ModuleList([body.layer1, body.layer2, body.layer3, body.layer4])
        self.channels = [body.conv1.out_channels] + [block_out_channels(layer[-1]) for layer in self.layers]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.stem(x)]
        x = self.maxpool(features[0])
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


class TransposedConvDecoder(nn.Module):
    """Five x2 upsampling stages (``ConvTranspose2d`` k=4 s=2 + norm + ReLU) and a 1x1 classifier.

    Args:
        encoder_channels: channels of the encoder features at strides 2, 4, 8, 16, 32.
        decoder_channels: output channels of the five stages (strides 16, 8, 4, 2, 1).
        num_classes: K, the logit channels.
        skip_connections: concatenate the encoder feature of the stage's output stride (strides
            16, 8, 4, 2) to the stage output, U-Net style.
        norm: ``bn`` (batch norm, the report's) or ``gn`` (group norm: no statistics across the batch, so
            a distributed run equals one process on the same global batch).
    """

    def __init__(self, encoder_channels: list[int], decoder_channels: list[int], num_classes: int,
                 skip_connections: bool = False, norm: str = "bn") -> None:
        super().__init__()
        if len(encoder_channels) != 5 or len(decoder_channels) != 5:
            raise ValueError(f"expected 5 encoder and 5 decoder channel counts, got {encoder_channels} "
                             f"and {decoder_channels}")
        self.skip_connections = skip_connections
        skips = [*encoder_channels[-2::-1], 0] if skip_connections else [0] * 5  # strides 16, 8, 4, 2, none
        inputs = [encoder_channels[-1]] + [c + s for c, s in zip(decoder_channels[:-1], skips[:-1])]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(cin, cout, kernel_size=4, stride=2, padding=1, bias=False),
                          NORMS["gn" if norm == "gn" else "bn"](cout), nn.ReLU(inplace=True))
            for cin, cout in zip(inputs, decoder_channels)
        )
        self.classifier = nn.Conv2d(decoder_channels[-1], num_classes, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.ConvTranspose2d, nn.Conv2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Encoder features (strides 2..32) -> float ``[B, K, H, W]`` logits at stride 1."""
        x = features[-1]
        skips = features[-2::-1]  # strides 16, 8, 4, 2
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if self.skip_connections and i < len(skips):
                x = torch.cat([x, skips[i]], dim=1)
        return self.classifier(x)


class SegResNet(nn.Module):
    """Semantic segmentation model with the torchvision detection calling convention.

    Inputs are float images in [0, 1]: a list of ``[C, H, W]`` tensors or a ``[B, C, H, W]`` batch,
    any size (padded to a multiple of 32 inside, logits cropped back). The model normalises them
    with ``image_mean`` / ``image_std``.

    Training (``model.train()`` and ``targets`` given): every target has ``labels`` int64 ``[H, W]``
    holding class indices ``0..K-1`` or ``ignore_index`` (unlabelled); the images must share one
    size. Returns ``{"loss_pce": scalar}``, the focal partial cross-entropy weighted by the
    ``class_weights`` buffer (float ``[K]``, saved with the checkpoint).

    Eval: returns one dict per image, ``{"probs": float32 [K, H, W] softmax, "labels": int64 [H, W]
    argmax}``; images of different sizes may share a list.

    Args:
        encoder: the multi-stride feature extractor.
        decoder: features -> logits.
        num_classes: K.
        image_mean, image_std: per band, on the [0, 1] scale.
        focal_gamma: focal exponent of the loss (0 = plain cross-entropy).
        ignore_index: label value of unlabelled pixels.
    """

    def __init__(self, encoder: ResNetEncoder, decoder: TransposedConvDecoder, num_classes: int,
                 image_mean: list[float], image_std: list[float], focal_gamma: float = 2.0,
                 ignore_index: int = 255) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.num_classes, self.focal_gamma, self.ignore_index = num_classes, focal_gamma, ignore_index
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("class_weights", torch.ones(num_classes))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """float ``[B, C, H, W]`` in [0, 1] -> float ``[B, K, H, W]`` class logits (any ``H, W``)."""
        height, width = images.shape[-2:]
        x = (images - self.image_mean) / self.image_std
        # Zero after normalisation is the mean colour: the padding looks like a featureless border.
        x = F.pad(x, (0, -width % STRIDE, 0, -height % STRIDE))
        return self.decoder(self.encoder(x))[..., :height, :width]

    def forward(self, images: list[torch.Tensor] | torch.Tensor,
                targets: list[dict[str, torch.Tensor]] | None = None
                ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("SegResNet in training mode needs targets (a 'labels' map per image)")
            return {"loss_pce": self._loss(_stack(images), targets)}
        if isinstance(images, torch.Tensor) or len({tuple(im.shape) for im in images}) == 1:
            return _outputs(self.logits(_stack(images)))
        return [_outputs(self.logits(image[None]))[0] for image in images]

    def _loss(self, batch: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        if len(targets) != batch.shape[0]:
            raise ValueError(f"{batch.shape[0]} images but {len(targets)} targets")
        labels = torch.stack([t["labels"] for t in targets]).to(batch.device, torch.int64)
        if labels.shape[-2:] != batch.shape[-2:]:
            raise ValueError(f"label maps of size {tuple(labels.shape[-2:])} do not match the images' "
                             f"{tuple(batch.shape[-2:])}")
        bad = ((labels >= self.num_classes) & (labels != self.ignore_index)) | (labels < 0)
        if bool(bad.any()):
            raise ValueError(f"labels hold values outside 0..{self.num_classes - 1} that are not the ignore "
                             f"index {self.ignore_index}: {sorted(labels[bad].unique().tolist())[:5]}")
        return partial_cross_entropy(self.logits(batch), labels, self.class_weights, self.focal_gamma,
                                     self.ignore_index)


def _stack(images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got {tuple(images.shape)}")
        return images
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) != 1:
        raise ValueError(f"training images must share one size (set data.image_size); got {sorted(sizes)}")
    return torch.stack(images)


def _outputs(logits: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    probs = logits.float().softmax(dim=1)
    return [{"probs": p, "labels": p.argmax(dim=0)} for p in probs]


def build_seg_resnet18(cfg: ModelConfig) -> SegResNet:
    """The report's model: ResNet-18 encoder, five-stage transposed-conv decoder, focal partial CE.

    Uses ``cfg.num_classes`` (K, every class including background-like ones), ``in_channels``,
    ``pretrained`` (``imagenet`` downloads torchvision weights), ``backbone_checkpoint``, ``norm``,
    ``trainable_layers``, ``image_mean`` / ``image_std`` and the ``cfg.seg`` section; the class
    weights are read from ``cfg.seg.class_weights`` when set.
    """
    body = build_resnet_body("resnet18", in_channels=cfg.in_channels, pretrained=cfg.pretrained,
                             checkpoint=cfg.backbone_checkpoint, norm=cfg.norm, trainable_layers=cfg.trainable_layers)
    encoder = ResNetEncoder(body)
    decoder = TransposedConvDecoder(encoder.channels, list(cfg.seg.decoder_channels), cfg.num_classes,
                                    cfg.seg.skip_connections, norm=cfg.norm)
    model = SegResNet(encoder, decoder, cfg.num_classes, list(cfg.image_mean), list(cfg.image_std),
                      cfg.seg.focal_gamma, cfg.seg.ignore_index)
    if cfg.seg.class_weights:
        model.class_weights.copy_(load_class_weights(Path(cfg.seg.class_weights), cfg.num_classes))
    return model

