"""Fourier blocks on feature maps: a learnable global frequency filter and RELACT's phase enhancement.

:class:`FourierFilter` (GFNet, Rao et al., NeurIPS 2021): the features go to the 2-D real Fourier
domain, are multiplied element-wise by a learnable complex weight (one per channel and frequency), and
come back. One multiplication in the frequency domain is a convolution with a kernel as large as the
map, so every output pixel sees the whole input. The PROMPT local prompt module applies it to box crops.

:class:`PhaseEnhancement` (RELACT): the phase of a feature map's spectrum carries where edges and
small structures are; the amplitude mostly carries how strong broad regions are. The block keeps the
phase, flattens the amplitude, transforms back and adds the result through a projection and a gate
that starts at zero, so at initialisation the block is the identity.

Both run their transforms in float32 even under autocast (half-precision FFTs are limited to
power-of-two sizes on CUDA and lose precision) and return the input's dtype.
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


AMPLITUDES = ("mean", "unit")
GATES = ("channel", "scalar")


class PhaseEnhancement(nn.Module):
    """``x + gate * proj(irfft2(phase-only rfft2(x)))``; shape ``[N, C, H, W]`` kept, any H and W.

    The reading of the RELACT paper taken here (it gives no formula): the spectrum ``F = rfft2(x)``
    (orthonormal) keeps its phase ``F / |F|`` and gets a flat amplitude: the channel's mean amplitude
    (``"mean"``, the default: the map keeps its energy scale) or 1 (``"unit"``: the classic phase-only
    reconstruction). The inverse transform is projected by a ``kernel x kernel`` convolution and added
    to ``x`` times a learnable gate, one per channel (``"channel"``, default) or one for all
    (``"scalar"``), initialised to 0: the block starts as the identity and learns how much to add.

    Args:
        channels: C.
        amplitude: ``mean`` or ``unit``.
        kernel: side of the projection convolution (1 or 3).
        gate: ``channel`` or ``scalar``.
    """

    def __init__(self, channels: int, amplitude: str = "mean", kernel: int = 1, gate: str = "channel") -> None:
        super().__init__()
        if amplitude not in AMPLITUDES:
            raise ValueError(f"phase amplitude must be one of {', '.join(AMPLITUDES)}, got {amplitude!r}")
        if gate not in GATES:
            raise ValueError(f"phase gate must be one of {', '.join(GATES)}, got {gate!r}")
        self.amplitude = amplitude
        self.proj = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)
        self.gate = nn.Parameter(torch.zeros(1, channels if gate == "channel" else 1, 1, 1))

    def phase_only(self, x: Tensor) -> Tensor:
        """The phase-only reconstruction of ``x`` ``[N, C, H, W]`` (float32)."""
        height, width = x.shape[-2:]
        with torch.autocast(device_type=x.device.type, enabled=False):
            spectrum = torch.fft.rfft2(x.float(), norm="ortho")
            magnitude = spectrum.abs()
            flat = magnitude.mean(dim=(-2, -1), keepdim=True) if self.amplitude == "mean" else 1.0
            spectrum = spectrum * (flat / magnitude.clamp(min=1e-6))
            return torch.fft.irfft2(spectrum, s=(height, width), norm="ortho")

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[N, C, H, W]`` -> ``[N, C, H, W]``, same dtype."""
        return x + self.gate.to(x.dtype) * self.proj(self.phase_only(x).to(x.dtype))
