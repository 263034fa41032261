"""The student's strong view in self-training: photometric only, so the teacher's pseudo-masks still fit.

Geometric changes (flips, rotations) come from the data pipeline before both views; the strong view
adds brightness and contrast jitter, Gaussian noise and, sometimes, a 3 x 3 blur. The draws use
torch's global generator, whose state every checkpoint stores, so a resumed run draws the same views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rsiseg.config import SamConfig


def strong_view(image: Tensor, options: SamConfig) -> Tensor:
    """A strongly augmented copy of ``image``.

    Args:
        image: float ``[C, H, W]`` in [0, 1].
        options: ``strong_jitter`` (brightness and contrast factors drawn from ``1 +- jitter``),
            ``strong_noise`` (noise std) and ``strong_blur`` (probability of the blur).

    Returns:
        float ``[C, H, W]`` in [0, 1], on ``image``'s device.
    """
    draws = torch.rand(3)  # brightness, contrast, blur or not: drawn on the CPU, the same on any device
    brightness = 1.0 + options.strong_jitter * (2 * draws[0].item() - 1)
    contrast = 1.0 + options.strong_jitter * (2 * draws[1].item() - 1)
    mean = image.mean(dim=(-2, -1), keepdim=True)
    out = ((image - mean) * contrast + mean) * brightness
    if options.strong_noise > 0:
        noise = torch.randn(image.shape) * options.strong_noise
        out = out + noise.to(image.device)
    if draws[2].item() < options.strong_blur:
        channels = image.shape[0]
        kernel = torch.tensor([1.0, 2.0, 1.0], device=image.device)
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(channels, 1, 3, 3)
        out = F.conv2d(F.pad(out[None], (1, 1, 1, 1), mode="replicate"), kernel, groups=channels)[0]
    return out.clamp(0.0, 1.0)
