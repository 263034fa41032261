"""RoIAlign on the CPU as one sparse matrix product, for every FPN level at once.

torchvision's CPU ``roi_align`` kernels are single-threaded scalar loops, and its backward recomputes
the bilinear weights of every sample once per channel: in CPU training of a Cascade R-CNN the backward
alone took 22% of a step. Here the weights are computed once, vectorised, as a sparse matrix ``W``
``[K * PH * PW, N]`` (``N`` = the feature positions of all levels, each row holding the 4 corners of
each of the ``S x S`` samples of one output bin, divided by ``S * S``), and

    pooled = W @ features      backward: grad_features = W^T @ grad_pooled

with the features channels-last ``[N, C]``. The values and the boundary rules are torchvision's
(``aligned`` either way): a sample more than one pixel outside the map is zero, one within a pixel is
clamped to the border. Only the summation order differs (float32 results agree to about 1e-6).

:class:`SparseRoIAlign` is a drop-in :class:`~torchvision.ops.MultiScaleRoIAlign`, and :func:`roi_align`
one for :func:`torchvision.ops.roi_align`: they take this path for float32/float64 CPU features with a
fixed ``sampling_ratio`` and leave everything else (GPU features, autocast's half types, tracing and
compiling, dispatch modes such as FLOP counting) to torchvision (:func:`sparse_applies`).
"""

from __future__ import annotations

import warnings

import torch
import torchvision
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def _axis_corners(coords: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """torchvision's bilinear rule along one axis for sample coordinates ``coords`` ``[K, bins, S]`` on
    maps of ``size`` ``[K, 1, 1]`` pixels along that axis.

    Returns:
        ``(low, high, weight of low, weight of high, inside)``, each ``[K, bins, S]``: ``inside``
        is False for samples more than one pixel outside ``[0, size]`` or not finite, whose weights must
        be zeroed (their corners are valid indices).
    """
    inside = (coords >= -1.0) & (coords <= size)  # False for NaN too
    coords = torch.where(inside, coords, 0.0).clamp(min=0)  # the indices of outside samples stay in the map
    low = coords.floor().long()
    at_edge = low >= size - 1
    low = low.clamp(max=size - 1)
    coords = torch.where(at_edge, low.to(coords.dtype), coords)
    high = torch.where(at_edge, low, low + 1)
    frac = coords - low
    return low, high, 1 - frac, frac, inside


def _sample_coordinates(start: Tensor, bin_size: Tensor, bins: int, s: int) -> Tensor:
    """``[K, bins, S]`` sample coordinates along one axis, in torchvision's order of float operations
    (``start + bin * size + (i + 0.5) * size / S``), so that float32 samples land where its kernel's do."""
    step = bin_size[:, None, None]
    bin_index = torch.arange(bins, dtype=start.dtype, device=start.device)[:, None]
    within = torch.arange(s, dtype=start.dtype, device=start.device) + 0.5
    return start[:, None, None] + bin_index * step + within * step / s


def sample_matrix(rois: Tensor, levels: Tensor, shapes: list[tuple[int, int, int]], offsets: list[int],
                  scales: list[float], output_size: tuple[int, int], sampling_ratio: int,
                  aligned: bool = False) -> Tensor:
    """The sparse CSR matrix ``W`` ``[K * PH * PW, N]`` of the module docstring.

    Each row holds its ``4 * S * S`` entries as they come (unsorted, a corner repeated at the map's
    edge with weight 0), which the CPU's CSR product (MKL or ATen's loop) sums as given: the matrix
    is built without PyTorch's invariant check, so every column is kept inside ``[0, N)`` here.

    Args:
        rois: ``[K, 5]`` (batch index, x1, y1, x2, y2) in image pixels; the batch indices must be
            those of images the features hold (:func:`sparse_roi_align` checks).
        levels: ``[K]`` int in ``[0, len(shapes))``, the level each RoI pools from.
        shapes: ``(B, H, W)`` of each level; ``offsets``: where each level starts in the ``N`` rows.
        scales: feature pixels per image pixel, per level.
        output_size: ``(PH, PW)``; ``sampling_ratio``: ``S`` > 0 samples per bin and axis.
        aligned: torchvision's ``aligned``: shift the box by -0.5 feature pixel (pixel centres), and
            keep boxes smaller than a pixel as they are instead of widening them to 1.
    """
    count, (bins_h, bins_w), s, device = len(rois), output_size, sampling_ratio, rois.device
    level_scale = torch.tensor(scales, dtype=rois.dtype, device=device)[levels]
    heights = torch.tensor([h for _, h, _ in shapes], device=device)[levels]
    widths = torch.tensor([w for _, _, w in shapes], device=device)[levels]
    starts = torch.tensor(offsets, device=device)[levels] + rois[:, 0].long() * heights * widths
    shift = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * level_scale - shift, rois[:, 2] * level_scale - shift
    width, height = rois[:, 3] * level_scale - shift - x1, rois[:, 4] * level_scale - shift - y1
    if not aligned:  # torchvision: malformed RoIs are 1x1
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    bin_w, bin_h = width / bins_w, height / bins_h
    ys = _sample_coordinates(y1, bin_h, bins_h, s)  # [K, PH, S]
    xs = _sample_coordinates(x1, bin_w, bins_w, s)  # [K, PW, S]
    y_low, y_high, wy_low, wy_high, y_in = _axis_corners(ys, heights[:, None, None])
    x_low, x_high, wx_low, wx_high, x_in = _axis_corners(xs, widths[:, None, None])

    def along_y(t: Tensor) -> Tensor:  # [K, PH, S] -> [K, PH, 1, S, 1]
        return t[:, :, None, :, None]

    def along_x(t: Tensor) -> Tensor:  # [K, PW, S] -> [K, 1, PW, 1, S]
        return t[:, None, :, None, :]

    row_low = starts[:, None, None] + y_low * widths[:, None, None]
    row_high = starts[:, None, None] + y_high * widths[:, None, None]
    columns = torch.stack([along_y(row_low) + along_x(x_low), along_y(row_low) + along_x(x_high),
                           along_y(row_high) + along_x(x_low), along_y(row_high) + along_x(x_high)], -1)
    weights = torch.stack([along_y(wy_low) * along_x(wx_low), along_y(wy_low) * along_x(wx_high),
                           along_y(wy_high) * along_x(wx_low), along_y(wy_high) * along_x(wx_high)], -1)
    weights = weights * (along_y(y_in) & along_x(x_in))[..., None] / (s * s)  # [K, PH, PW, S, S, 4]
    per_row = 4 * s * s
    rows = count * bins_h * bins_w
    crow = torch.arange(rows + 1, dtype=torch.int64, device=device) * per_row
    total = sum(b * h * w for b, h, w in shapes)
    with warnings.catch_warnings():  # "sparse CSR support is in beta", once per process
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, columns.reshape(-1), weights.reshape(-1), size=(rows, total),
                                       check_invariants=False)


class _SparseProduct(torch.autograd.Function):
    """``W @ features`` with the gradient ``W^T @ grad`` to the features (none to ``W``).

    ``W^T`` is taken as an uncoalesced COO matrix built from ``W``'s CSR arrays: transposing the CSR
    matrix itself re-sorts every entry by column, which costs 3x the product.
    """

    @staticmethod
    def forward(ctx, matrix: Tensor, features: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(matrix)
        return matrix @ features

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        (matrix,) = ctx.saved_tensors
        crow = matrix.crow_indices()
        rows = torch.repeat_interleave(torch.arange(matrix.shape[0], device=crow.device), crow[1:] - crow[:-1])
        transposed = torch.sparse_coo_tensor(torch.stack([matrix.col_indices(), rows]), matrix.values(),
                                             (matrix.shape[1], matrix.shape[0]), is_coalesced=False,
                                             check_invariants=False)
        return None, torch.sparse.mm(transposed, grad.contiguous())


def sparse_roi_align(features: list[Tensor], rois: Tensor, levels: Tensor, scales: list[float],
                     output_size: tuple[int, int], sampling_ratio: int, aligned: bool = False) -> Tensor:
    """RoIAlign of ``rois`` ``[K, 5]``, each from its level ``levels`` ``[K]`` of ``features``
    (``[B, C, H_l, W_l]`` per level, on the CPU): a contiguous ``[K, C, PH, PW]``, as torchvision's
    per-level ``roi_align`` gives.

    Raises:
        ValueError: a RoI's batch index is not that of an image of ``features``.
    """
    channels = features[0].shape[1]
    shapes = [(f.shape[0], f.shape[2], f.shape[3]) for f in features]
    batch = rois[:, 0].detach()
    bad = ~(torch.isfinite(batch) & (batch >= 0) & (batch < shapes[0][0]))
    if bad.any():
        k = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"RoI {k} has batch index {batch[k].item()}, but the features hold {shapes[0][0]} images "
                         f"({int(bad.sum())} RoIs out of range)")
    sizes = [b * h * w for b, h, w in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    with torch.no_grad():
        matrix = sample_matrix(rois.detach(), levels, shapes, offsets, scales, output_size, sampling_ratio, aligned)
    flat = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, channels) for f in features])  # [N, C]
    pooled = _SparseProduct.apply(matrix.to(flat.dtype), flat)  # [K * PH * PW, C]
    return pooled.reshape(len(rois), *output_size, channels).permute(0, 3, 1, 2).contiguous()


# MKL's sparse product takes 32-bit indices: larger matrices go to torchvision's kernels.
_MAX_INDEX = 2**31 - 1


def sparse_applies(features: list[Tensor], rois: Tensor, output_size: tuple[int, int], sampling_ratio: int) -> bool:
    """Whether :func:`sparse_roi_align` serves these inputs: non-empty float32/float64 CPU features
    (one image count across levels) and RoIs of their dtype, a fixed ``sampling_ratio``, indices that
    fit 32 bits, and no autocast, tracing, scripting, compiling, functorch transform (vmap) or dispatch
    mode (under FlopCounterMode the sparse product would count as a dense ``[K * PH * PW, N] x [N, C]``
    matmul). Everything else keeps torchvision's kernels, which also raise its errors."""
    if sampling_ratio <= 0 or not features:
        return False
    entries = len(rois) * output_size[0] * output_size[1] * 4 * sampling_ratio ** 2
    positions = sum(f.shape[0] * f.shape[2] * f.shape[3] for f in features)
    return (not torchvision._is_tracing() and not torch.jit.is_scripting() and not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode() and not torch._C._are_functorch_transforms_active()
            and not torch.is_autocast_enabled("cpu") and rois.dtype == features[0].dtype
            and rois.device.type == "cpu" and entries <= _MAX_INDEX and positions <= _MAX_INDEX
            and len({f.shape[0] for f in features}) == 1
            and all(f.device.type == "cpu" and f.dtype == features[0].dtype and f.numel() > 0 for f in features)
            and features[0].dtype in (torch.float32, torch.float64))


def roi_align(input: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """:func:`torchvision.ops.roi_align` (same arguments: ``input`` ``[B, C, H, W]``, ``boxes`` ``[K, 5]``
    or one ``[K_b, 4]`` per image), through :func:`sparse_roi_align` where :func:`sparse_applies`:
    ``[K, C, PH, PW]``."""
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    rois = boxes if isinstance(boxes, Tensor) else _convert_to_roi_format(boxes)
    if not sparse_applies([input], rois, size, sampling_ratio):
        return torchvision.ops.roi_align(input, boxes, size, spatial_scale, sampling_ratio, aligned)
    return sparse_roi_align([input], rois, torch.zeros(len(rois), dtype=torch.int64, device=rois.device),
                            [spatial_scale], size, sampling_ratio, aligned)


class SparseRoIAlign(MultiScaleRoIAlign):
    """:class:`~torchvision.ops.MultiScaleRoIAlign` through :func:`sparse_roi_align` on the CPU.

    Same arguments, outputs ``[K, C, PH, PW]`` and level mapping (a RoI whose level is not one of the
    maps, e.g. an inverted box's, pools zeros as there); see the module docstring for when
    torchvision's kernels run instead.
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        rois = _convert_to_roi_format(boxes) if boxes else torch.zeros(0, 5)
        if not sparse_applies(features, rois, self.output_size, self.sampling_ratio):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        levels = torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
        if len(features) > 1:
            mapped = self.map_levels(boxes)
            pooled = (mapped >= 0) & (mapped < len(features))
            levels = torch.where(pooled, mapped, 0)
            rois = torch.where(pooled[:, None], rois, rois.new_tensor([0.0, *[float("nan")] * 4]))  # zeros
        return sparse_roi_align(features, rois, levels, self.scales, self.output_size, self.sampling_ratio)
