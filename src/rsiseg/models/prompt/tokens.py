"""Box crops and patch tokens, shared by the local (LPM) and global-to-local (GPM) prompt modules."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.ops import roi_align


def crop_boxes(images: Tensor, boxes: list[Tensor], size: int) -> Tensor:
    """Bilinear crops of every box, resized to ``size x size``, in one batched ``roi_align`` call.

    Args:
        images: ``[B, C, H, W]`` float images (not a feature map).
        boxes: B tensors ``[K_i, 4]``, xyxy in pixels of ``images`` (continuous coordinates: pixel ``j``
            spans ``[j, j + 1)``, hence ``aligned=True``).
        size: side of the crops.

    Returns:
        ``[K, C, size, size]``, ``K = sum K_i``, boxes of image 0 first, then image 1, and so on.
    """
    if len(boxes) != images.shape[0]:
        raise ValueError(f"got {len(boxes)} box tensors for a batch of {images.shape[0]} images")
    boxes = [b.to(device=images.device, dtype=images.dtype) for b in boxes]
    return roi_align(images, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)


def patch_grid(size: int, kernel: int, stride: int, padding: int) -> int:
    """Tokens per side of a ``size x size`` map after a ``kernel``/``stride``/``padding`` convolution."""
    return (size + 2 * padding - kernel) // stride + 1


class PatchTokens(nn.Module):
    """Patch partition: a strided convolution, flattened to tokens, then LayerNorm.

    With ``kernel > stride`` neighbouring patches overlap (the prompt modules' local tokens); with
    ``kernel == stride`` and no padding it is the ViT partition (the GPM's global tokens).

    Args:
        in_channels: C of the input (any band count).
        dim: D, the token width.
        kernel: patch size.
        stride: distance between patches.
        padding: zero padding on each side.
    """

    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int, padding: int = 0) -> None:
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.proj = nn.Conv2d(in_channels, dim, kernel, stride, padding)
        self.norm = nn.LayerNorm(dim)

    def grid(self, size: int) -> int:
        """Tokens per side for a ``size x size`` input."""
        return patch_grid(size, self.kernel, self.stride, self.padding)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[N, C, S, S]`` -> tokens ``[N, grid(S) ** 2, D]`` in row-major order."""
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))
