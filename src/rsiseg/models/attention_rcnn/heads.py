"""The report's RoI heads: a 2-FC box head with dropout, and a residual 4-conv mask head."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor


class DropoutTwoMLPHead(nn.Module):
    """Two FC layers with ReLU, dropout after each (so also before the predictors).

    ``[K, C, 7, 7]`` RoI features -> ``[K, dim]``.
    """

    def __init__(self, in_features: int, dim: int = 1024, dropout: float = 0.3) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, dim)
        self.fc7 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(nn.functional.relu(self.fc6(x.flatten(start_dim=1))))
        return self.dropout(nn.functional.relu(self.fc7(x)))


class ResidualMaskHead(nn.Module):
    """``num_convs`` 3x3 conv-BN-ReLU layers with a residual connection over the stack through a 1x1 projection.

    ``[K, C, 14, 14]`` -> ``[K, channels, 14, 14]``: ``relu(convs(x) + project(x))``. The
    upsampling and the mask logits follow in torchvision's ``MaskRCNNPredictor``.
    """

    def __init__(self, in_channels: int, channels: int = 256, num_convs: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.project = nn.Conv2d(in_channels, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.relu(self.convs(x) + self.project(x))


def kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal weights (fan-out for convolutions, fan-in for FC layers) and zero biases in ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def init_output_layers(box_predictor: FastRCNNPredictor, mask_logits: nn.Conv2d, rpn_head: nn.Module) -> None:
    """Small normal weights for the layers whose outputs are logits or box deltas.

    Kaiming-normal there would start the box deltas at O(1) per coordinate and the logits far
    from uniform; the first iterations would then mostly undo the initialisation.
    """
    for layer, std in ((box_predictor.cls_score, 0.01), (box_predictor.bbox_pred, 0.001), (mask_logits, 0.001),
                       (rpn_head.cls_logits, 0.01), (rpn_head.bbox_pred, 0.01)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
