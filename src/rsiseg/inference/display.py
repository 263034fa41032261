"""Display conversion of remote-sensing images of any band count to 8-bit RGB.

``to_display_rgb`` turns a 1-band (SAR), 3-band (RGB) or N-band image, as a tensor or array,
integer or float, into ``uint8[H, W, 3]`` for overlays and figures, stretching only images that
would otherwise look black or flat.
"""

from __future__ import annotations

import numpy as np
import torch

# An image whose 2-98 percentile span is below this is "dark or low-contrast" and gets
# stretched; linear SAR and 12-bit data scaled as uint16 typically span only a few percent.
_LOW_CONTRAST_SPAN = 0.5
# Percentiles are estimated on at most about this many pixels: np.percentile sorts, and a
# full 4000 x 4000 x 3 scene would take seconds for no visible difference.
_STRETCH_SAMPLES = 250_000
# Beyond 16 entries an axis is taken to be spatial, not bands.
_MAX_BANDS = 16


def to_display_rgb(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Convert an image of any band count to RGB for display.

    Band choice: 1 band -> grey; 2 bands (e.g. SAR VV/VH) -> the first band as grey;
    3 -> as is; more than 3 -> the first three. A per-band 2-98 percentile stretch is applied
    only when the image is dark or low-contrast (2-98 percentile span below 0.5) or outside
    [0, 1], so ordinary RGB keeps its colours and linear SAR stops looking black.

    Args:
        image: a torch tensor ``C x H x W`` (or ``H x W``), float in [0, 1] or integer;
            or a numpy array: integer ``H x W x C`` (e.g. uint8, uint16), float ``C x H x W``,
            or ``H x W``. Integers are scaled by their dtype's maximum. When the assumed band
            axis has more than 16 entries and the other end has at most 16, the other is used.

    Returns:
        ``uint8[H, W, 3]``.
    """
    bands = _as_hwc_float(image)
    shown = bands[..., :1] if bands.shape[2] < 3 else bands[..., :3]
    if _needs_stretch(shown):
        shown = _percentile_stretch(shown)
    rgb = np.clip(shown, 0.0, 1.0) * 255.0 + 0.5
    rgb = rgb.astype(np.uint8)
    return np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else np.ascontiguousarray(rgb)


def _as_hwc_float(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Any supported image -> ``float32[H, W, C]`` (values not yet clipped)."""
    channels_last = False
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    else:
        image = np.asarray(image)
        channels_last = image.dtype.kind in "ui"
    if image.ndim == 2:
        image = image[..., None]
        channels_last = True
    if image.ndim != 3:
        raise ValueError(f"expected an image of 2 or 3 dims, got shape {image.shape}")
    band_axis, other_axis = (2, 0) if channels_last else (0, 2)
    if image.shape[band_axis] > _MAX_BANDS >= image.shape[other_axis]:
        channels_last = not channels_last
    if not channels_last:
        image = image.transpose(1, 2, 0)
    if image.dtype.kind in "ui":
        return image.astype(np.float32) / float(np.iinfo(image.dtype).max)
    if image.dtype == bool:
        return image.astype(np.float32)
    return np.nan_to_num(image.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)


def _subsample(image: np.ndarray) -> np.ndarray:
    """A strided ``[M, C]`` sample of the pixels, M at most about ``_STRETCH_SAMPLES``."""
    step = max(1, int(np.sqrt(image.shape[0] * image.shape[1] / _STRETCH_SAMPLES)))
    return image[::step, ::step].reshape(-1, image.shape[2])


def _needs_stretch(image: np.ndarray) -> bool:
    sample = _subsample(image)
    lo, hi = np.percentile(sample, [2, 98])
    return bool(hi - lo < _LOW_CONTRAST_SPAN or sample.min() < 0.0 or sample.max() > 1.0)


def _percentile_stretch(image: np.ndarray) -> np.ndarray:
    """Map each band's 2nd..98th percentile to [0, 1]; constant bands are left as they are."""
    lo, hi = np.percentile(_subsample(image), [2, 98], axis=0)  # [C] each
    span = hi - lo
    flat = span <= 1e-6
    scale = np.where(flat, 1.0, 1.0 / np.where(flat, 1.0, span))
    offset = np.where(flat, 0.0, lo)
    return (image - offset.astype(np.float32)) * scale.astype(np.float32)
