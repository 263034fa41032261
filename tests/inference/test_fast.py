"""The fast eval path: batch norms folded into their convolutions give the same outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from rsiseg.inference.fast import fold_batchnorm, prepare_for_inference
from rsiseg.models.registry import build_model
from tests.models.test_mask_rcnn import tiny


def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Give every batch norm non-trivial statistics, as a trained model has."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


@pytest.mark.parametrize("norm", ["bn", "frozen_bn"])
def test_folded_model_gives_the_same_outputs(norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(norm=norm, box_score_thresh=0.0)).eval()
    randomise_norms(model)
    image = torch.rand(3, 128, 128)
    with torch.no_grad():
        features = model.backbone(image[None])
        before = model([image])[0]
    n_norms = sum(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules())
    assert fold_batchnorm(model) == n_norms == 20  # ResNet-18: stem + 16 in blocks + 3 downsamples
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules())
    with torch.no_grad():
        folded = model.backbone(image[None])
        after = model([image])[0]
    for key in features:
        torch.testing.assert_close(folded[key], features[key], atol=1e-4, rtol=1e-4)
    assert len(after["scores"]) == len(before["scores"]) > 0
    torch.testing.assert_close(after["scores"], before["scores"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after["boxes"], before["boxes"], atol=1e-2, rtol=1e-4)


def test_only_certain_pairs_are_folded() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3)
            self.bn2 = nn.BatchNorm2d(4)  # no conv2: its input is unknown
            self.seq = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.BatchNorm2d(4))  # not adjacent

    model = Odd().eval()
    assert fold_batchnorm(model) == 0
    with pytest.raises(RuntimeError, match="eval mode"):
        fold_batchnorm(model.train())
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).eval()
    randomise_norms(seq)
    x = torch.rand(2, 3, 9, 9)
    expected = seq(x)
    assert prepare_for_inference(seq, channels_last=True) == {"folded": 1, "channels_last": True}
    torch.testing.assert_close(seq(x), expected, atol=1e-5, rtol=1e-5)
    assert isinstance(seq[1], nn.Identity)


def test_fast_prompt_model_keeps_its_fourier_weights_usable() -> None:
    """Channels-last applies to convolution weights only: the LPM's Fourier filter still runs."""
    torch.manual_seed(0)
    model = build_model(tiny(name="maskrcnn_r18_prompt", box_score_thresh=0.0)).eval()
    image = torch.rand(3, 128, 128)
    with torch.no_grad():
        before = model([image])[0]
    prepare_for_inference(model, channels_last=True)
    with torch.no_grad():
        after = model([image])[0]
    assert len(after["scores"]) == len(before["scores"])
    torch.testing.assert_close(after["scores"], before["scores"], atol=1e-4, rtol=1e-4)
