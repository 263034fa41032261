"""Prototype-based regularization of PointSAM: pooled instance features, clustered and matched.

A *prototype* is the mean image-encoder feature under one instance's mask. Target prototypes
summarise the data: prototypes collected over many images (a :class:`PrototypeBank`) are clustered
with cosine k-means into a few centres. The prototypes of the current batch's predicted masks are
matched one-to-one to those centres with the Hungarian algorithm, and the loss pulls each matched
pair together (``1 - cos``). It keeps the adapted encoder's features of one category compact while
the student learns from noisy pseudo-masks.

Everything here is independent of SAM itself: features ``[B, C, h, w]`` and masks in any resolution.
"""

from __future__ import annotations

import torch
import torch.distributed
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

# Total mask weight below which a mask counts as vanished at feature resolution.
_MIN_WEIGHT = 1e-6


def _resize_masks(masks: Tensor, size: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """``[N, H, W]`` bool or float -> ``[N, h, w]`` float weights in [0, 1]."""
    weights = masks.to(dtype).unsqueeze(1)
    if tuple(weights.shape[-2:]) == size:
        return weights.squeeze(1)
    # Area averaging when shrinking gives each feature cell the fraction of it the mask covers
    # (bilinear would sample a few pixels and miss thin or small objects); bilinear when growing.
    shrinking = weights.shape[-2] >= size[0] and weights.shape[-1] >= size[1]
    if shrinking:
        weights = F.interpolate(weights, size=size, mode="area")
    else:
        weights = F.interpolate(weights, size=size, mode="bilinear", align_corners=False)
    return weights.squeeze(1).clamp(0.0, 1.0)


def masked_average_pool(features: Tensor, masks: Tensor, image_index: Tensor) -> tuple[Tensor, Tensor]:
    """Mean feature under each mask, the mask resized to the feature grid and used as weights.

    Args:
        features: ``[B, C, h, w]`` float, e.g. SAM's image embeddings (``C = 256``, ``h = w = 64``).
        masks: ``[N, H, W]`` bool, or float in [0, 1] (soft masks); any ``H, W``, resized to ``h, w``
            by area averaging (or bilinear interpolation when ``H < h`` or ``W < w``).
        image_index: ``[N]`` int64 in ``[0, B)``: the image each mask belongs to.

    Returns:
        ``protos`` ``[N, C]`` in the features' dtype, differentiable w.r.t. ``features`` (and soft
        ``masks``), and ``valid`` ``[N]`` bool. A mask whose resized weights sum to ~0 (it vanished at
        feature resolution) is not valid and its prototype is all zeros (never NaN); leave those out
        of any loss.
    """
    if features.dim() != 4 or masks.dim() != 3:
        raise ValueError(f"expected features [B, C, h, w] and masks [N, H, W], got {features.shape} and {masks.shape}")
    if image_index.shape != (masks.shape[0],):
        raise ValueError(f"image_index must be [N] = [{masks.shape[0]}], got {tuple(image_index.shape)}")
    batch, channels, height, width = features.shape
    count = masks.shape[0]
    if count and (int(image_index.min()) < 0 or int(image_index.max()) >= batch):
        raise ValueError(f"image_index must lie in [0, {batch}), got values {image_index.min()}..{image_index.max()}")
    weights = _resize_masks(masks, (height, width), features.dtype).flatten(1)  # [N, h*w]
    flat = features.flatten(2)  # [B, C, h*w]
    sums = features.new_zeros(count, channels)
    # One matmul per image rather than gathering features[image_index]: that copy is N x C x h x w.
    for b in image_index.unique().tolist():
        rows = (image_index == b).nonzero().squeeze(1)
        sums = sums.index_copy(0, rows, weights[rows] @ flat[b].T)
    total = weights.sum(1)
    valid = total > _MIN_WEIGHT
    protos = torch.where(valid[:, None], sums / total.clamp_min(_MIN_WEIGHT)[:, None], torch.zeros_like(sums))
    return protos, valid


def _kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Indices ``[k]`` of k-means++ seeds among unit vectors ``x`` ``[M, C]`` (cosine distance)."""
    chosen = [int(torch.randint(len(x), (1,), generator=generator))]
    distance = (1.0 - x @ x[chosen[0]]).clamp_min(0.0)
    for _ in range(1, k):
        # Sampling runs on the CPU generator, so the seeds are the same on any device.
        weights = distance.double().cpu()
        if float(weights.sum()) <= 0.0:  # every point coincides with a seed: any unused one will do
            weights = torch.ones_like(weights)
            weights[chosen] = 0.0
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        distance = torch.minimum(distance, (1.0 - x @ x[chosen[-1]]).clamp_min(0.0))
    return torch.tensor(chosen, device=x.device)


def spherical_kmeans(x: Tensor, k: int, iters: int = 20, seed: int = 0) -> Tensor:
    """Cosine k-means: points and centres on the unit sphere, assignment by the largest cosine.

    Args:
        x: ``[M, C]`` float points (any norm; they are L2-normalised, zero rows stay zero).
        k: number of clusters, >= 1.
        iters: at most this many assignment/update rounds; stops early once assignments are stable.
        seed: seeds the k-means++ initialisation (a CPU ``torch.Generator``): the same input and seed
            give the same centres.

    Returns:
        ``[min(k, M), C]`` float32 unit-norm centres, detached. A cluster that empties is re-seeded
        with the point farthest (lowest cosine) from its own centre.
    """
    if k < 1:
        raise ValueError(f"spherical_kmeans needs k >= 1, got {k}")
    if x.dim() != 2:
        raise ValueError(f"spherical_kmeans expects points [M, C], got {tuple(x.shape)}")
    k = min(k, len(x))
    if k == 0:
        return x.new_zeros(0, x.shape[1], dtype=torch.float32)
    with torch.no_grad():
        points = F.normalize(x.detach().float(), dim=1)
        generator = torch.Generator().manual_seed(seed)
        centres = points[_kmeans_plus_plus(points, k, generator)]
        previous = None
        for _ in range(iters):
            similarity = points @ centres.T  # [M, k]
            assign = similarity.argmax(1)
            if previous is not None and torch.equal(assign, previous):
                break
            previous = assign
            # One-hot matmul instead of index_add: deterministic on GPU as well.
            sums = F.one_hot(assign, k).to(points.dtype).T @ points
            empty = (F.one_hot(assign, k).sum(0) == 0).nonzero().squeeze(1)
            if len(empty):
                own = similarity.gather(1, assign[:, None]).squeeze(1)
                sums[empty] = points[own.argsort(stable=True)[: len(empty)]]
            centres = F.normalize(sums, dim=1)
    return centres


def hungarian_match(pred: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """One-to-one matching of predicted to target prototypes minimising the total ``1 - cos``.

    Args:
        pred: ``[N, C]`` predicted prototypes.
        targets: ``[K, C]`` target prototypes.

    Returns:
        ``(pred_index, target_index)``, each ``[min(N, K)]`` int64 on ``pred``'s device, sorted by
        ``pred_index``. The cost is computed detached, on the CPU (scipy ``linear_sum_assignment``).
    """
    if pred.dim() != 2 or targets.dim() != 2 or pred.shape[1] != targets.shape[1]:
        raise ValueError(f"expected pred [N, C] and targets [K, C], got {tuple(pred.shape)} and {tuple(targets.shape)}")
    empty = torch.zeros(0, dtype=torch.int64, device=pred.device)
    if len(pred) == 0 or len(targets) == 0:
        return empty, empty.clone()
    with torch.no_grad():
        cost = 1.0 - F.normalize(pred.detach().float(), dim=1) @ F.normalize(targets.detach().float(), dim=1).T
        # scipy refuses non-finite costs; a NaN prototype still makes the loss NaN, which the
        # trainer's non-finite guard reports, so the matcher only has to not crash.
        cost = torch.nan_to_num(cost, nan=1.0, posinf=2.0, neginf=0.0)
    rows, cols = linear_sum_assignment(cost.cpu().double().numpy())
    return (
        torch.as_tensor(rows, dtype=torch.int64).to(pred.device),
        torch.as_tensor(cols, dtype=torch.int64).to(pred.device),
    )


def prototype_loss(pred: Tensor, targets: Tensor) -> Tensor:
    """Mean ``1 - cos`` over the Hungarian-matched pairs of ``pred`` ``[N, C]`` and ``targets`` ``[K, C]``.

    Targets are constants (detached); the loss is differentiable w.r.t. ``pred``. Returns a float32
    scalar in [0, 2]; 0, still connected to ``pred``'s graph, when ``N == 0`` or ``K == 0``.
    """
    pred_index, target_index = hungarian_match(pred, targets)
    if len(pred_index) == 0:
        return pred.float().sum() * 0.0
    matched = targets.detach()[target_index].to(device=pred.device, dtype=torch.float32)
    return (1.0 - F.cosine_similarity(pred[pred_index].float(), matched, dim=1)).mean()


def gather_rows(rows: Tensor) -> Tensor:
    """Every rank's ``rows`` ``[N_r, dim]`` (any ``N_r``, 0 too), concatenated in rank order, on every rank;
    ``rows`` itself outside a distributed run. Every rank must call it at the same point of the step."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    world = torch.distributed.get_world_size()
    if world == 1:
        return rows
    count = torch.tensor([len(rows)], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    most = int(max(int(c) for c in counts))
    if most == 0:  # every rank agrees: nothing to gather
        return rows
    padded = rows.new_zeros((most, *rows.shape[1:]))
    padded[: len(rows)] = rows
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(c)] for part, c in zip(parts, counts)])


class PrototypeBank(nn.Module):
    """Ring buffer of recent target prototypes and their cluster centres, all kept as buffers.

    Buffers (saved in ``state_dict``, so resuming from a checkpoint restores the bank exactly):
        ``bank`` ``[size, dim]`` float32: the prototypes, oldest overwritten first.
        ``count`` int64 scalar: prototypes pushed so far (``min(count, size)`` rows are filled).
        ``centres`` ``[k, dim]`` float32 unit-norm: the last clustering (rows past ``num_centres`` are 0).
        ``num_centres`` int64 scalar: centres from the last :meth:`recluster` (0 until the first).

    Under DistributedDataParallel every rank pushes the prototypes of every rank's images
    (:func:`gather_rows`, in rank order) and reclusters with the same seed, so the banks of all ranks
    stay equal (DDP's buffer broadcast from rank 0 then changes nothing).

    Args:
        dim: C of the prototypes.
        size: capacity of the ring buffer.
        k: number of cluster centres (target prototypes).
    """

    def __init__(self, dim: int, size: int = 512, k: int = 8) -> None:
        super().__init__()
        if dim < 1 or size < 1 or k < 1:
            raise ValueError(f"PrototypeBank needs dim, size, k >= 1, got {dim}, {size}, {k}")
        self.dim, self.size, self.k = dim, size, k
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("centres", torch.zeros(k, dim))
        self.register_buffer("num_centres", torch.zeros((), dtype=torch.int64))

    @property
    def filled(self) -> int:
        """Number of valid rows of ``bank``."""
        return min(int(self.count), self.size)

    @torch.no_grad()
    def push(self, protos: Tensor) -> None:
        """Append ``protos`` ``[N, dim]`` (detached, stored as float32), overwriting the oldest rows.

        Only the newest ``size`` rows are kept when ``N > size``. No host sync: positions are computed
        on the buffers' device.
        """
        if protos.dim() != 2 or protos.shape[1] != self.dim:
            raise ValueError(f"PrototypeBank.push expects [N, {self.dim}], got {tuple(protos.shape)}")
        pushed = len(protos)
        if pushed == 0:
            return
        kept = protos.detach()[-self.size :].to(self.bank)
        start = self.count + (pushed - len(kept))
        positions = (start + torch.arange(len(kept), device=self.bank.device)) % self.size
        self.bank[positions] = kept
        self.count += pushed

    @torch.no_grad()
    def recluster(self, seed: int) -> None:
        """Recompute ``centres`` by :func:`spherical_kmeans` over the filled rows; no-op while empty."""
        filled = self.filled
        if filled == 0:
            return
        centres = spherical_kmeans(self.bank[:filled], self.k, seed=seed)
        self.centres.zero_()
        self.centres[: len(centres)] = centres.to(self.centres)
        self.num_centres.fill_(len(centres))

    def targets(self) -> Tensor:
        """The current target prototypes ``[num_centres, dim]`` float32 (``[0, dim]`` before clustering)."""
        return self.centres[: int(self.num_centres)]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, k={self.k}"
