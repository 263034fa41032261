"""The overfit loop: train on a handful of images until the model fits them (a debugging aid).

A model that cannot fit two images has a bug (a wrong target format, a loss that ignores a
head, a frozen parameter), and the full trainer would take hours to show it. This loop takes
items already loaded (augmentation is off, so an item never changes and is read once), trains
with the config's optimizer at a constant learning rate after a short warmup, and evaluates on
the same images every few iterations with the task's own evaluation, stopping as soon as the
headline metric reaches the target.

Choices, and why:

- The lr schedule of the config is replaced by a constant one: cosine and step schedules are
  tied to the full run's length and would only slow the fit down. Warmup is kept but capped at
  :data:`MAX_WARMUP` iterations, enough to keep SGD on a fresh detection head from diverging.
- Everything else of the optimizer is the config's (type, lr, momentum, weight decay, lr
  multipliers, gradient clipping, mixed precision on CUDA), since those are what is debugged.
- Batches are the config's ``train.batch_size`` (at most the number of images), shuffled per
  epoch as the trainer's sampler does, so a run is a pure function of ``train.seed``.
- A non-finite loss skips its batch, as in the trainer; it is counted in the result. After
  :data:`MAX_SKIPPED_IN_A_ROW` such batches in a row the weights are taken to have diverged
  (they rarely come back from NaN) and the run stops, which says more than N silent iterations.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from rsiseg.config import ExperimentConfig
from rsiseg.engine.optim import LRSchedule, build_optimizer
from rsiseg.engine.sampler import epoch_batches
from rsiseg.evaluation.metrics import metric_value
from rsiseg.tasks.base import Task, TaskDataset

log = logging.getLogger(__name__)

MAX_WARMUP = 10  # iterations of linear warmup at most, whatever train.warmup_iters says
MAX_SKIPPED_IN_A_ROW = 10  # non-finite losses in a row that end the run as diverged
# The metric the loop stops on, by preference: the first one the task's evaluation gives.
HEADLINE_METRICS = ("prompt/mIoU", "segm/AP50", "bbox/AP50", "semantic/mIoU")  # the first a task gives

Item = tuple[torch.Tensor, dict[str, Any]]  # image float [C, H, W] in [0, 1], target dict


@dataclass
class OverfitResult:
    """What an overfit run did.

    Attributes:
        metric: the ``"<group>/<stat>"`` name the run stopped on.
        target: the value it had to reach.
        reached: whether an evaluation reached ``target``.
        iterations: training iterations done.
        seconds: wall time of training and evaluations.
        skipped_batches: batches skipped for a non-finite loss.
        diverged: the run stopped after :data:`MAX_SKIPPED_IN_A_ROW` non-finite losses in a row.
        evals: one record per evaluation: ``iteration``, ``seconds`` (since the start), ``losses``
            (mean of each loss over the iterations since the previous evaluation) and ``metrics``
            (every number of the evaluation, flat ``"<group>/<stat>"`` names, None where undefined).
    """

    metric: str
    target: float
    reached: bool = False
    iterations: int = 0
    seconds: float = 0.0
    skipped_batches: int = 0
    diverged: bool = False
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_value(self) -> float:
        """The metric at the last evaluation (NaN before any, or where undefined)."""
        value = self.evals[-1]["metrics"].get(self.metric) if self.evals else None
        return math.nan if value is None else float(value)


def headline_metric(task: Task, cfg: ExperimentConfig) -> str:
    """The metric an overfit stops on: prompted mIoU, segm AP50 when segm is evaluated, else bbox AP50, or mIoU.

    Falls back to the task's first metric for a task that gives none of :data:`HEADLINE_METRICS`.
    """
    names = task.metric_names(cfg)
    return next((name for name in HEADLINE_METRICS if name in names), names[0])


def overfit(model: nn.Module, task: Task, cfg: ExperimentConfig, items: list[Item], eval_set: TaskDataset,
            device: torch.device, *, max_iters: int, target: float, eval_every: int, metric: str,
            progress: bool = True) -> OverfitResult:
    """Train ``model`` on ``items`` until ``metric`` on ``eval_set`` reaches ``target``, or ``max_iters``.

    Args:
        model: the model, already on ``device`` (seed the RNGs before building it for a repeatable run).
        task: evaluates the model (its ``evaluate``) on ``eval_set``.
        cfg: the experiment config: its ``train`` section gives the optimizer, batch size and seed.
        items: the training items, ``(image float [C, H, W] in [0, 1], target)``, un-augmented.
        eval_set: the same images with the targets the task evaluates against.
        device: where to train.
        max_iters: iterations at most.
        target: stop once ``metric >= target`` at an evaluation.
        eval_every: iterations between evaluations (the last iteration is always evaluated).
        metric: a ``"<group>/<stat>"`` name from ``task.metric_names(cfg)``.
        progress: show a tqdm bar.

    Returns:
        The :class:`OverfitResult`; the model is left in its final state.
    """
    train = replace(cfg.train, scheduler="constant", warmup_iters=min(cfg.train.warmup_iters, MAX_WARMUP))
    optimizer = build_optimizer(model, train)
    batch_size = min(train.batch_size, len(items))
    schedule = LRSchedule(optimizer, train, math.ceil(len(items) / batch_size), max_iters)
    use_amp = train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    result = OverfitResult(metric, target)
    window: list[dict[str, float]] = []
    started = time.monotonic()
    bar = tqdm(total=max_iters, desc="overfit", disable=not progress, dynamic_ncols=True)
    skipped_in_a_row = 0
    for batch in _endless_batches(len(items), batch_size, train.seed):
        losses = _step(model, [items[i] for i in batch], optimizer, scaler, device, use_amp, train.grad_clip)
        schedule.step()
        result.iterations += 1
        bar.update(1)
        skipped_in_a_row = 0 if losses is not None else skipped_in_a_row + 1
        result.diverged = skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW
        if losses is None:
            result.skipped_batches += 1
            log.warning("iteration %d: non-finite loss, batch skipped", result.iterations)
        else:
            window.append(losses)
        if result.iterations % eval_every == 0 or result.iterations >= max_iters or result.diverged:
            _evaluate(model, task, cfg, eval_set, device, result, window, started)
            window = []
        bar.set_postfix(loss=f"{losses['loss']:.3f}" if losses else "nan", **{metric: f"{result.last_value:.3f}"},
                        refresh=False)
        if result.reached or result.diverged or result.iterations >= max_iters:
            break
    bar.close()
    result.seconds = time.monotonic() - started
    return result


def _endless_batches(count: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Item indices of batches, epoch after epoch, shuffled as the trainer's sampler shuffles them."""
    for epoch in itertools.count():
        yield from epoch_batches(count, batch_size, seed, epoch)


def _step(model: nn.Module, batch: list[Item], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
          device: torch.device, use_amp: bool, grad_clip: float | None) -> dict[str, float] | None:
    """One optimisation step, as the trainer's; returns the losses, or None when they were not finite."""
    model.train()
    images = [image.to(device) for image, _ in batch]
    targets = [{k: v.to(device) for k, v in target.items()} for _, target in batch]
    with torch.autocast(device.type, enabled=use_amp):
        losses = model(images, targets)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(total):
        return None
    scaler.scale(total).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return {"loss": total.item(), **{k: v.item() for k, v in losses.items()}}


def _evaluate(model: nn.Module, task: Task, cfg: ExperimentConfig, eval_set: TaskDataset, device: torch.device,
              result: OverfitResult, window: list[dict[str, float]], started: float) -> None:
    """Evaluate, append the record to ``result.evals`` and set ``result.reached``."""
    metrics = task.evaluate(model, eval_set, cfg, device, num_workers=0, progress=False)
    flat = {f"{group}/{stat}": _finite_or_none(value) for group, stats in metrics.items() if isinstance(stats, dict)
            for stat, value in stats.items() if value is None or isinstance(value, (int, float))}
    keys = sorted({key for losses in window for key in losses})
    mean_losses = {key: sum(w[key] for w in window if key in w) / sum(key in w for w in window) for key in keys}
    result.evals.append({"iteration": result.iterations, "seconds": round(time.monotonic() - started, 3),
                         "losses": mean_losses, "metrics": flat})
    value = metric_value(metrics, result.metric)
    result.reached = math.isfinite(value) and value >= result.target
    log.info("iteration %d: %s = %.4f (target %.3g)", result.iterations, result.metric, value, result.target)


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: an undefined metric is None."""
    return None if value is None or not math.isfinite(value) else float(value)
