"""A learnable global frequency filter (GFNet, Rao et al., NeurIPS 2021).

The features go to the 2-D real Fourier domain, are multiplied element-wise by a learnable complex
weight (one per channel and frequency), and come back. One multiplication in the frequency domain is a
convolution with a kernel as large as the map, so every output pixel sees the whole input. The filter
is generic: the PROMPT local prompt module applies it to box crops, and RELACT's phase enhancement can
use it on feature maps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def identity_filter_weight(channels: int, height: int, width: int, noise_std: float = 0.0) -> Tensor:
    """Real view ``[C, H, W // 2 + 1, 2]`` of a complex filter equal to 1 (plus Gaussian noise of ``noise_std``)."""
    weight = torch.zeros(channels, height, width // 2 + 1, 2)
    weight[..., 0] = 1.0
    if noise_std > 0:
        weight.add_(torch.randn_like(weight) * noise_std)
    return weight


class FourierFilter(nn.Module):
    """``irfft2(rfft2(x) * W)``: a learnable per-channel filter over all frequencies; shape ``[N, C, H, W]`` kept.

    The transform runs in float32 even under autocast (half-precision FFTs are limited to power-of-two
    sizes on CUDA and lose precision); the result is cast back to the input dtype. ``norm="ortho"`` in
    both directions, so a weight of exactly ``1 + 0j`` is the identity.

    Args:
        channels: C.
        height: H of every input (the weight is tied to the frequency grid of this size).
        width: W of every input.
        noise_std: std of the Gaussian noise added to the ``(1, 0)`` initialisation, so the filter starts
            near the identity but not on it.

    Attributes:
        weight: ``[C, H, W // 2 + 1, 2]`` float, the real and imaginary parts of the complex weight.
    """

    def __init__(self, channels: int, height: int, width: int, noise_std: float = 0.02) -> None:
        super().__init__()
        self.size = (height, width)
        self.weight = nn.Parameter(identity_filter_weight(channels, height, width, noise_std))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[N, C, H, W]`` real -> ``[N, C, H, W]`` real, same dtype as ``x``."""
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(
                f"FourierFilter was built for {self.size[0]}x{self.size[1]} inputs, got {x.shape[-2]}x{x.shape[-1]}"
            )
        height, width = self.size
        with torch.autocast(device_type=x.device.type, enabled=False):
            spectrum = torch.fft.rfft2(x.float(), norm="ortho")
            spectrum = spectrum * torch.view_as_complex(self.weight.float())
            out = torch.fft.irfft2(spectrum, s=(height, width), norm="ortho")
        return out.to(x.dtype)
