"""Negative prompt calibration of PointSAM: overlapping instances prompt each other away.

With one positive point per instance, SAM often returns a mask that spills over neighbouring
instances of dense scenes (ships moored side by side, cars in a parking lot). PointSAM finds the
instances whose masks overlap, re-decodes each of them with the neighbours' points added as
negative prompts (label 0), and finally makes the masks mutually exclusive.

The functions are frame-agnostic: masks and points only have to share one pixel frame (SAM's
resized 1024 input or the original image).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements of one [N, chunk] working tensor; bounds the memory for thousands of instances on 1024^2 masks.
_CHUNK_ELEMENTS = 1 << 24


def _point_pixels(points: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """``[N, 2]`` float (x, y) -> integer pixel ``(x [N], y [N])``, floored and clamped into the image."""
    pixels = points.detach().floor().long()
    return pixels[:, 0].clamp(0, width - 1), pixels[:, 1].clamp(0, height - 1)


def _check(masks: Tensor, points: Tensor) -> None:
    if masks.dim() != 3 or points.shape != (masks.shape[0], 2):
        raise ValueError(
            f"expected masks [N, H, W] and points [N, 2], got {tuple(masks.shape)} and {tuple(points.shape)}"
        )


def _intersections(masks: Tensor) -> Tensor:
    """Pairwise overlap in pixels ``[N, N]`` float32 of bool masks ``[N, H, W]``, in pixel chunks."""
    flat = masks.flatten(1)
    count, pixels = flat.shape
    inter = flat.new_zeros(count, count, dtype=torch.float32)
    step = max(1, _CHUNK_ELEMENTS // max(count, 1))
    for start in range(0, pixels, step):
        # float32 counts are exact up to 2^24 pixels, far above any mask area here.
        chunk = flat[:, start : start + step].float()
        inter += chunk @ chunk.T
    return inter


def overlap_negatives(masks: Tensor, points: Tensor, min_overlap: float = 0.0) -> list[Tensor]:
    """For each instance, the other instances that should become its negative prompts.

    Instance ``j != i`` is a negative of ``i`` when ``j``'s point lies inside mask ``i`` (the point
    floored to its pixel, clamped into the image), or when the masks overlap by strictly more than
    ``min_overlap`` times the smaller of the two areas. With the default 0.0 a single shared pixel
    is enough; an empty mask never overlaps anything.

    Args:
        masks: ``[N, H, W]`` bool (or 0/1 integers) predicted masks, one per instance.
        points: ``[N, 2]`` float (x, y) pixels: each instance's positive point.
        min_overlap: fraction in [0, 1) of the smaller area that the overlap must exceed.

    Returns:
        ``N`` int64 tensors on ``masks``' device, the ``i``-th holding the sorted indices ``j``.
    """
    _check(masks, points)
    if not 0.0 <= min_overlap < 1.0:
        raise ValueError(f"min_overlap is a fraction of the smaller mask in [0, 1), got {min_overlap}")
    masks = masks != 0
    count, height, width = masks.shape
    if count == 0:
        return []
    xs, ys = _point_pixels(points.to(masks.device), height, width)
    contains = masks[:, ys, xs]  # [i, j]: mask i holds point j
    inter = _intersections(masks)
    area = inter.diagonal()
    smaller = torch.minimum(area[:, None], area[None, :])
    overlapping = inter > min_overlap * smaller
    neighbours = (contains | overlapping) & ~torch.eye(count, dtype=torch.bool, device=masks.device)
    rows, cols = neighbours.nonzero(as_tuple=True)
    return list(cols.split(torch.bincount(rows, minlength=count).tolist()))


def negative_prompts(
    points: Tensor, negatives: list[Tensor], *, max_negatives: int | None = None
) -> tuple[Tensor, Tensor]:
    """Per-instance SAM point prompts: its own point (label 1), then its negatives' points (label 0).

    Rows are padded to a common length with SAM's padding convention, point ``(0, 0)`` with label
    -1, which ``PromptEncoder._embed_points`` replaces by its "not a point" embedding, so padding
    does not change the answer.

    Args:
        points: ``[N, 2]`` float (x, y) positive points, one per instance.
        negatives: ``N`` int64 tensors of indices into ``points`` (e.g. from :func:`overlap_negatives`).
        max_negatives: keep at most this many negatives per instance, the ones nearest to its own
            point (None: keep all). Bounds the prompt length in dense scenes.

    Returns:
        ``coords`` ``[N, 1 + P, 2]`` (points' dtype) and ``labels`` ``[N, 1 + P]`` int64 in {1, 0, -1},
        P being the largest number of negatives kept for any instance.
    """
    if points.dim() != 2 or points.shape[1] != 2 or len(negatives) != len(points):
        raise ValueError(f"expected points [N, 2] and N index tensors, got {tuple(points.shape)} and {len(negatives)}")
    if max_negatives is not None and max_negatives < 0:
        raise ValueError(f"max_negatives must be >= 0 or None, got {max_negatives}")
    count, device = len(points), points.device
    lengths = torch.tensor([len(n) for n in negatives], dtype=torch.int64, device=device)
    others = torch.cat([n.to(device=device, dtype=torch.int64) for n in negatives]) if count else lengths
    owners = torch.repeat_interleave(torch.arange(count, device=device), lengths)
    # Order each instance's negatives by distance to its point (stable sorts: distance, then owner),
    # so that a cap keeps the nearest ones and the order is reproducible.
    distance = (points[others] - points[owners]).detach().norm(dim=1)
    order = distance.argsort(stable=True)
    order = order[owners[order].argsort(stable=True)]
    others, owners = others[order], owners[order]
    starts = torch.cumsum(lengths, 0) - lengths
    rank = torch.arange(len(others), device=device) - starts[owners]
    if max_negatives is not None:
        keep = rank < max_negatives
        others, owners, rank = others[keep], owners[keep], rank[keep]
    width = 1 + (int(rank.max()) + 1 if len(rank) else 0)
    coords = points.new_zeros(count, width, 2)
    labels = torch.full((count, width), -1, dtype=torch.int64, device=device)
    coords[:, 0], labels[:, 0] = points, 1
    coords[owners, 1 + rank] = points[others]
    labels[owners, 1 + rank] = 0
    return coords, labels


def exclusive_masks(masks: Tensor, scores: Tensor, points: Tensor) -> Tensor:
    """Make masks mutually exclusive: each pixel claimed by several masks goes to one of them.

    The rule for a contested pixel ``(x, y)``: among the masks that claim it, the instance whose point
    pixel (floored, clamped) is nearest in squared pixel distance wins; ties go to the higher score,
    then to the lower index. An instance's own point pixel is at distance 0, so every instance keeps
    its point pixel if its mask had it (unless two points share one pixel: the higher score keeps
    it). Pixels claimed by one mask or none are unchanged.

    Args:
        masks: ``[N, H, W]`` bool (or 0/1 integers).
        scores: ``[N]`` float, e.g. SAM's predicted IoU.
        points: ``[N, 2]`` float (x, y) pixels, each instance's positive point.

    Returns:
        ``[N, H, W]`` bool, no pixel in two masks; a new tensor (the input is not modified).
    """
    _check(masks, points)
    if scores.shape != (masks.shape[0],):
        raise ValueError(f"scores must be [N] = [{masks.shape[0]}], got {tuple(scores.shape)}")
    out = masks != 0  # a new tensor, edited below
    count, height, width = out.shape
    if count < 2:
        return out
    px, py = _point_pixels(points.to(out.device), height, width)
    scores = scores.detach().to(out.device)
    ys, xs = (out.sum(0) > 1).nonzero(as_tuple=True)
    step = max(1, _CHUNK_ELEMENTS // count)
    for start in range(0, len(ys), step):
        y, x = ys[start : start + step], xs[start : start + step]
        claims = out[:, y, x]  # [N, chunk]
        distance = (x[None] - px[:, None]) ** 2 + (y[None] - py[:, None]) ** 2
        distance = distance.masked_fill(~claims, torch.iinfo(distance.dtype).max)
        nearest = claims & (distance == distance.min(0, keepdim=True).values)
        # argmax returns the first maximum, i.e. the lowest index among equal scores.
        winner = torch.where(nearest, scores[:, None], float("-inf")).argmax(0)
        out[:, y, x] = False
        out[winner, y, x] = True
    return out
