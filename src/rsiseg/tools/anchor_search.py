"""Anchors suggested by the data: k-means on box sizes, and an optuna search on recall.

Both produce :class:`~rsiseg.tools.anchor_recall.AnchorConfig` s of one fixed shape, a
:class:`SearchSpace`: ``S`` sizes per level and ``R`` ratios (shared, or per level), so every
candidate has ``S x R`` anchors per location. A configuration with more anchors therefore never
wins the search by count alone; configurations of other counts are only compared in the table.

A level's base size stays within :data:`SIZE_BOUNDS` strides (P2 8-32 px, P3 16-64 px, ...,
P6 128-512 px; torchvision's default anchors are 8 strides, the iSAID report's 2 and 4): recall
alone would pull every size down to P2's dense grid, which is not what a detector wants (a
level's features see objects of about its stride's scale). Levels are kept in size order: the
bases are sorted across levels, which keeps each within its level's bounds, as the bounds rise
with the level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from rsiseg.tools.anchor_boxes import BoxSet
from rsiseg.tools.anchor_recall import AnchorConfig, best_anchor_iou

NOMINAL_STRIDES = (4, 8, 16, 32, 64)  # P2-P6
SIZE_BOUNDS = (2.0, 8.0)  # a level's base size, in multiples of its stride: the references span 2x-8x
RATIO_BOUNDS = (0.2, 5.0)  # height / width
STEP_BOUNDS = (1.2, 2.5)  # between consecutive sizes of a level
SIZES_PER_STRIDE = 4.0  # the k-means level rule: a level takes cluster scales near 4x its stride
OBJECTIVES = ("recall@0.5", "recall@0.7", "recall@0.75", "mean_best_iou")


def level_sizes(base: int, step: float, count: int) -> list[int]:
    """``count`` sizes ``round(base * step**i)``: the one rule for a level's sizes, search and k-means alike."""
    return [int(round(base * step**i)) for i in range(count)]


def size_bounds(level: int) -> tuple[int, int]:
    """Smallest and largest base size (pixels) allowed on ``level`` (0 = P2)."""
    stride = NOMINAL_STRIDES[level]
    return math.ceil(SIZE_BOUNDS[0] * stride), math.floor(SIZE_BOUNDS[1] * stride)


@dataclass(frozen=True)
class SearchSpace:
    """The shape of suggested anchors: levels, sizes per level, ratio count, shared or per-level ratios."""

    num_levels: int = 5
    sizes_per_level: int = 1
    num_ratios: int = 3
    per_level_ratios: bool = False

    @property
    def per_location(self) -> int:
        return self.sizes_per_level * self.num_ratios

    def config(self, name: str, params: dict[str, Any]) -> AnchorConfig:
        """The anchors of a parameter dict (optuna's names: ``p2_size``, ``p2_step``, ``ratio0`` or ``p2_ratio0``)."""
        # levels in size order (module docstring): a coarser level never gets the smaller anchors
        levels = sorted((params[f"p{lv + 2}_size"], params.get(f"p{lv + 2}_step", 2.0))
                        for lv in range(self.num_levels))
        sizes = [level_sizes(base, step, self.sizes_per_level) for base, step in levels]
        groups = [f"p{lv + 2}_" for lv in range(self.num_levels)] if self.per_level_ratios else [""]
        ratios = [sorted(round(params[f"{g}ratio{i}"], 2) for i in range(self.num_ratios)) for g in groups]
        return AnchorConfig(name, sizes, ratios)

    def suggest(self, trial: Any) -> AnchorConfig:
        """Draw one configuration from an optuna trial."""
        params: dict[str, Any] = {}
        for lv in range(self.num_levels):
            params[f"p{lv + 2}_size"] = trial.suggest_int(f"p{lv + 2}_size", *size_bounds(lv), log=True)
            if self.sizes_per_level > 1:
                params[f"p{lv + 2}_step"] = trial.suggest_float(f"p{lv + 2}_step", *STEP_BOUNDS)
        groups = [f"p{lv + 2}_" for lv in range(self.num_levels)] if self.per_level_ratios else [""]
        for g in groups:
            for i in range(self.num_ratios):
                params[f"{g}ratio{i}"] = trial.suggest_float(f"{g}ratio{i}", *RATIO_BOUNDS, log=True)
        return self.config("optuna trial", params)

    def params_of(self, config: AnchorConfig) -> dict[str, Any] | None:
        """Parameters that reproduce ``config`` exactly (to enqueue it), or None when outside the space."""
        if config.num_levels != self.num_levels or any(len(s) != self.sizes_per_level for s in config.sizes):
            return None
        params: dict[str, Any] = {}
        for lv, sizes in enumerate(config.sizes):
            lo, hi = size_bounds(lv)
            params[f"p{lv + 2}_size"] = sizes[0]
            if self.sizes_per_level > 1:
                params[f"p{lv + 2}_step"] = sizes[1] / sizes[0]
                if not STEP_BOUNDS[0] <= params[f"p{lv + 2}_step"] <= STEP_BOUNDS[1]:
                    return None
            if not lo <= sizes[0] <= hi:
                return None
        per_level = config.level_ratios()
        if self.per_level_ratios:
            groups = [f"p{lv + 2}_" for lv in range(self.num_levels)]
        elif any(level != per_level[0] for level in per_level):
            return None
        else:
            groups, per_level = [""], per_level[:1]
        for g, level in zip(groups, per_level):
            if len(level) != self.num_ratios or not all(RATIO_BOUNDS[0] <= r <= RATIO_BOUNDS[1] for r in level):
                return None
            params |= {f"{g}ratio{i}": r for i, r in enumerate(level)}
        same = self.config(config.name, params)
        return params if (same.sizes, same.level_ratios()) == (config.sizes, config.level_ratios()) else None


def wh_iou(wh: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """IoU ``[N, K]`` of boxes ``[N, 2]`` and centroids ``[K, 2]`` given as (w, h), aligned at one corner."""
    inter = np.minimum(wh[:, None, 0], centroids[None, :, 0]) * np.minimum(wh[:, None, 1], centroids[None, :, 1])
    return inter / (wh[:, 0:1] * wh[:, 1:2] + (centroids[:, 0] * centroids[:, 1])[None] - inter)


def kmeans_iou(wh: np.ndarray, k: int, seed: int = 0, max_iter: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """k-means of box sizes with distance ``1 - IoU`` (YOLO's anchor clustering), deterministic for a seed.

    Seeded k-means++ initialisation, then Lloyd steps with the median of each cluster (robust to
    the long tail of box sizes) until no box changes cluster.

    Args:
        wh: float ``[N, 2]`` box widths and heights (positive).
        k: clusters; fewer when there are fewer distinct boxes.
        seed: seed of the initialisation.
        max_iter: cap on Lloyd steps.

    Returns:
        ``centroids`` float64 ``[k, 2]`` (w, h) sorted by area, and ``counts`` int64 ``[k]``.
    """
    wh = np.asarray(wh, dtype=np.float64).reshape(-1, 2)
    if len(wh) == 0:
        raise ValueError("k-means of anchor sizes needs at least one box")
    k = min(k, len(np.unique(wh, axis=0)))
    rng = np.random.default_rng(seed)
    centroids = wh[[rng.integers(len(wh))]]
    while len(centroids) < k:
        dist = (1 - wh_iou(wh, centroids)).min(axis=1) ** 2
        centroids = np.vstack([centroids, wh[rng.choice(len(wh), p=dist / dist.sum())]])
    assign = np.full(len(wh), -1)
    for _ in range(max_iter):
        new = wh_iou(wh, centroids).argmax(axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            if (assign == j).any():  # an emptied cluster keeps its centre
                centroids[j] = np.median(wh[assign == j], axis=0)
    counts = np.bincount(wh_iou(wh, centroids).argmax(axis=1), minlength=k)
    order = np.argsort(centroids[:, 0] * centroids[:, 1], kind="stable")
    return centroids[order], counts[order]


def _kmeans_1d(values: np.ndarray, weights: np.ndarray, k: int, iters: int = 100) -> np.ndarray:
    """Weighted 1-D k-means, started at the weighted quantiles ``(i + 0.5) / k``; sorted centres ``[k]``."""
    order = np.argsort(values)
    values, weights = values[order], weights[order].astype(np.float64)
    cdf = (np.cumsum(weights) - weights / 2) / weights.sum()
    centres = np.interp((np.arange(k) + 0.5) / k, cdf, values)
    for _ in range(iters):
        assign = np.abs(values[:, None] - centres[None]).argmin(axis=1)
        for j in range(k):
            if weights[assign == j].sum() > 0:
                centres[j] = np.average(values[assign == j], weights=weights[assign == j])
    return np.sort(centres)


def kmeans_anchor_config(box_set: BoxSet, space: SearchSpace, n_clusters: int = 9,
                         seed: int = 0) -> tuple[AnchorConfig, dict[str, Any]]:
    """Anchors from k-means clusters of the resized box sizes.

    The rule: cluster (w, h) into ``n_clusters`` with :func:`kmeans_iou`. The ratios are the
    weighted (by cluster size) 1-D k-means of the centroids' log(h / w) into ``num_ratios``
    values. Each centroid's scale ``sqrt(w h)`` goes to the level whose ``4 x stride`` is nearest
    in log scale (P2 takes everything below ~11 px, P6 everything above ~181 px); a level's
    sizes are centred on the weighted geometric mean of its centroids' scales (``4 x stride``
    when it has none), spaced by ``2**(1 / sizes_per_level)`` so that they span one octave,
    and held within :data:`SIZE_BOUNDS`.

    Returns:
        The configuration (named ``k-means``) and the clusters: centroids, counts and levels.
    """
    wh = (box_set.boxes[:, 2:] - box_set.boxes[:, :2]).numpy()
    centroids, counts = kmeans_iou(wh, n_clusters, seed=seed)
    scale = np.sqrt(centroids[:, 0] * centroids[:, 1])
    nominal = SIZES_PER_STRIDE * np.asarray(NOMINAL_STRIDES[: space.num_levels], dtype=np.float64)
    levels = np.clip(np.round(np.log2(scale / nominal[0])), 0, space.num_levels - 1).astype(int)
    weights = np.maximum(counts, 1e-9)
    log_ratios = _kmeans_1d(np.log(centroids[:, 1] / centroids[:, 0]), weights, space.num_ratios)
    ratios = [float(np.clip(round(math.exp(r), 2), *RATIO_BOUNDS)) for r in log_ratios]
    step = 2.0 ** (1 / space.sizes_per_level)
    params: dict[str, Any] = {}
    for lv in range(space.num_levels):
        mine = levels == lv
        centre = math.exp(np.average(np.log(scale[mine]), weights=weights[mine])) if mine.any() else nominal[lv]
        lo, hi = size_bounds(lv)
        params[f"p{lv + 2}_size"] = int(np.clip(round(centre * step ** (-(space.sizes_per_level - 1) / 2)), lo, hi))
        if space.sizes_per_level > 1:
            params[f"p{lv + 2}_step"] = step
    groups = [f"p{lv + 2}_" for lv in range(space.num_levels)] if space.per_level_ratios else [""]
    params |= {f"{g}ratio{i}": r for g in groups for i, r in enumerate(ratios)}
    clusters = {"centroids_wh": np.round(centroids, 2).tolist(), "counts": counts.tolist(),
                "levels": [f"P{lv + 2}" for lv in levels], "seed": seed}
    return space.config("k-means", params), clusters


@dataclass
class SearchResult:
    """The outcome of :func:`search_anchors`: the best anchors, their objective and every trial."""

    best: AnchorConfig
    best_value: float
    trials: list[dict[str, Any]]
    enqueued: list[str]


def objective_value(box_set: BoxSet, config: AnchorConfig, objective: str) -> float:
    """``recall@t`` (share of boxes with best anchor IoU >= t) or ``mean_best_iou`` of ``config``."""
    best, _ = best_anchor_iou(box_set, config)
    if len(best) == 0:
        return 0.0
    if objective == "mean_best_iou":
        return float(best.mean())
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown anchor objective {objective!r}; one of {', '.join(OBJECTIVES)}")
    return float((best >= float(objective.split("@")[1])).double().mean())


def search_anchors(box_set: BoxSet, space: SearchSpace, *, trials: int, objective: str = "recall@0.7",
                   seed: int = 0, start: Sequence[AnchorConfig] = (), progress: bool = True) -> SearchResult:
    """Maximise ``objective`` over ``space`` with optuna's TPE sampler (seeded).

    Args:
        box_set: the boxes the objective is computed on (a subsample, for speed).
        space: the configuration shape; anchors per location stay ``space.per_location``.
        trials: optuna trials, the enqueued ones included.
        objective: one of :data:`OBJECTIVES`.
        seed: the sampler's seed.
        start: configurations tried first (``enqueue_trial``) where ``space`` can express them
            exactly, so the best is at least as good as each of them on ``box_set``.
        progress: show a tqdm bar.
    """
    import optuna

    if objective not in OBJECTIVES:
        raise ValueError(f"unknown anchor objective {objective!r}; one of {', '.join(OBJECTIVES)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    enqueued = []
    for config in start:
        params = space.params_of(config)
        if params is not None:
            study.enqueue_trial(params)
            enqueued.append(config.name)
    bar = tqdm(total=trials, desc=f"anchor search ({objective})", disable=not progress)
    best_so_far = [0.0]  # kept here: study.best_value deep-copies every trial

    def run_trial(trial: Any) -> float:
        value = objective_value(box_set, space.suggest(trial), objective)
        best_so_far[0] = max(best_so_far[0], value)
        bar.update(1)
        bar.set_postfix(best=f"{best_so_far[0]:.4f}")
        return value

    study.optimize(run_trial, n_trials=trials)
    bar.close()
    rows = [{"number": t.number, "value": t.value, "params": t.params} for t in study.trials]
    return SearchResult(space.config("optuna best", study.best_trial.params), study.best_value, rows, enqueued)

