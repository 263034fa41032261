"""The training loop: iterations, evaluation, checkpoints, exact resume.

A run directory holds ``config.yaml`` (the resolved config), ``last.pth`` and ``best.pth``,
``metrics.jsonl``, ``tensorboard/`` and ``curves.png``. ``resume=True`` continues from
``last.pth`` with the same iteration, optimizer, scheduler, scaler and RNG state; the data
order is a function of (seed, epoch) and augmentation draws of (seed, epoch, index), so a
resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from rsiseg.config import ExperimentConfig, dump_config, to_dict
from rsiseg.data.coco import CocoInstanceDataset, collate
from rsiseg.data.transforms import build_train_transforms
from rsiseg.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from rsiseg.engine.logging import RunLogger, plot_curves
from rsiseg.engine.optim import LRSchedule, build_optimizer
from rsiseg.evaluation.coco import format_metrics_table, metric_value, write_metrics
from rsiseg.inference.predictor import evaluate_model, select_device
from rsiseg.models.registry import build_model

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch, a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(num_items, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, num_items, batch_size)]


class Trainer:
    """Trains the model an :class:`ExperimentConfig` describes.

    Args:
        cfg: the resolved experiment config.
        resume: continue from ``<output_dir>/last.pth``.
        progress: show tqdm bars.
    """

    def __init__(self, cfg: ExperimentConfig, resume: bool = False, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.run_dir = Path(cfg.train.output_dir)
        self.device = select_device(cfg.train.device)
        seed_everything(cfg.train.seed)
        self.train_set, self.val_set = self._datasets()
        self._check_classes()
        self.model = build_model(cfg.model).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.iters_per_epoch = math.ceil(len(self.train_set) / cfg.train.batch_size)
        total = cfg.train.epochs * self.iters_per_epoch
        self.total_iters = min(total, cfg.train.max_iters) if cfg.train.max_iters else total
        self.schedule = LRSchedule(self.optimizer, cfg.train, self.iters_per_epoch, self.total_iters)
        self.use_amp = cfg.train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.iteration, self.epoch, self.skipped_batches = 0, 0, 0
        self.best: float | None = None
        self.last_metrics: dict[str, Any] = {}
        if resume:
            self._resume()
        else:
            dump_config(cfg, self.run_dir / "config.yaml")
        self.logger = RunLogger(self.run_dir, cfg.train.tensorboard, self.iteration if resume else None)

    def fit(self) -> dict[str, Any]:
        """Train to the end and return the last evaluation metrics."""
        cfg = self.cfg.train
        log.info("training %s for %d iterations (%d per epoch) on %s", self.cfg.model.name, self.total_iters,
                 self.iters_per_epoch, self.device)
        bar = tqdm(total=self.total_iters, initial=self.iteration, desc="train", disable=not self.progress,
                   dynamic_ncols=True)
        evaluated_at = -1
        while self.iteration < self.total_iters:
            self._train_epoch(bar)
            finished_epoch = self.iteration % self.iters_per_epoch == 0
            if finished_epoch:
                self.epoch += 1
            due = cfg.eval_interval > 0 and finished_epoch and self.epoch % cfg.eval_interval == 0
            if self.val_set is not None and (due or self.iteration >= self.total_iters):
                self.evaluate()
                evaluated_at = self.iteration
            self.save("last.pth")
        bar.close()
        if self.val_set is not None and evaluated_at != self.iteration:
            self.evaluate()
        self._finish()
        return self.last_metrics

    def train_step(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, float] | None:
        """One optimisation step; returns the losses, or None when a non-finite loss skipped it."""
        self.model.train()
        images = [img.to(self.device, non_blocking=True) for img in images]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(self.device.type, enabled=self.use_amp):
            losses = self.model(images, targets)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(total):
            self.skipped_batches += 1
            log.warning("iteration %d: non-finite loss %s, batch skipped (%d so far)", self.iteration,
                        {k: v.item() for k, v in losses.items()}, self.skipped_batches)
            return None
        self.scaler.scale(total).backward()
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"loss": total.item(), **{k: v.item() for k, v in losses.items()}}

    def evaluate(self) -> dict[str, Any]:
        """COCO-evaluate on the validation split, log, keep the best checkpoint and feed the scheduler."""
        metrics, _ = evaluate_model(self.model, self.val_set, self.cfg.eval, self.device,
                                    self.cfg.data.num_workers, self.progress)
        self.last_metrics = metrics
        flat = {f"{t}/{k}": v for t, m in metrics.items() for k, v in m.items() if isinstance(v, (int, float))}
        self.logger.write("eval", self.iteration, self.epoch, flat)
        value = metric_value(metrics, self.cfg.train.best_metric)
        self.schedule.step_metric(metric_value(metrics, self.cfg.train.plateau_metric)
                                  if self.cfg.train.scheduler == "plateau" else value)
        log.info("iteration %d: %s = %.4f", self.iteration, self.cfg.train.best_metric, value)
        if math.isfinite(value) and (self.best is None or value > self.best):
            self.best = value
            self.save("best.pth")
            write_metrics(metrics, self.run_dir / "best_metrics.json")
        return metrics

    def save(self, name: str) -> None:
        save_checkpoint(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": self.epoch,
                "iteration": self.iteration,
                "rng_state": rng_state(),
                "config": to_dict(self.cfg),
                "metrics": {"best": self.best, "skipped_batches": self.skipped_batches},
                "classes": {"names": self.train_set.class_names,
                            "category_ids": self.train_set.label_to_category},
            },
            self.run_dir / name,
        )

    def _train_epoch(self, bar: tqdm) -> None:
        cfg = self.cfg.train
        done_in_epoch = self.iteration - self.epoch * self.iters_per_epoch
        batches = epoch_batches(len(self.train_set), cfg.batch_size, cfg.seed, self.epoch)[done_in_epoch:]
        self.train_set.set_epoch(self.epoch)
        loader = DataLoader(self.train_set, batch_sampler=batches, num_workers=self.cfg.data.num_workers,
                            collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed + self.epoch))
        started = time.perf_counter()
        for images, targets in loader:
            losses = self.train_step(images, targets)
            self.schedule.step()
            self.iteration += 1
            bar.update(1)
            if losses is not None:
                bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{self._lr():.2e}", refresh=False)
                if self.iteration % cfg.log_interval == 0 or self.iteration == 1:
                    rate = (time.perf_counter() - started) / max(1, len(images))
                    self.logger.write("train", self.iteration, self.epoch, {**losses, "lr": self._lr(), "s_per_img": rate})
            started = time.perf_counter()
            if cfg.checkpoint_interval and self.iteration % cfg.checkpoint_interval == 0:
                self.save("last.pth")
            if self.iteration >= self.total_iters:
                break

    def _lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def _datasets(self) -> tuple[CocoInstanceDataset, CocoInstanceDataset | None]:
        data, channels = self.cfg.data, self.cfg.model.in_channels
        if not data.train_ann or not data.train_images:
            raise ValueError("data.train_ann and data.train_images must be set to train")
        train = CocoInstanceDataset(data.train_ann, data.train_images, in_channels=channels, repair=data.repair,
                                    transforms=build_train_transforms(data, channels), seed=self.cfg.train.seed)
        val = None
        if data.val_ann:
            val = CocoInstanceDataset(data.val_ann, data.val_images or data.train_images, in_channels=channels,
                                      repair=data.repair)
        return train, val

    def _check_classes(self) -> None:
        found = len(self.train_set.class_names)
        if found != self.cfg.model.num_classes:
            raise ValueError(f"model.num_classes is {self.cfg.model.num_classes} but {self.train_set.index.ann_file} "
                             f"has {found} categories ({', '.join(self.train_set.class_names)})")

    def _resume(self) -> None:
        path = self.run_dir / "last.pth"
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iteration = state["epoch"], state["iteration"]
        self.best = state["metrics"].get("best")
        self.skipped_batches = state["metrics"].get("skipped_batches", 0)
        set_rng_state(state["rng_state"])
        log.info("resumed from %s at iteration %d (epoch %d)", path, self.iteration, self.epoch)

    def _finish(self) -> None:
        self.logger.close()
        plot_curves(self.logger.path, self.run_dir / "curves.png")
        if self.last_metrics:
            write_metrics(self.last_metrics, self.run_dir / "metrics.json")
            log.info("final metrics:\n%s", format_metrics_table(self.last_metrics))
        for dataset in (self.train_set, self.val_set):
            if dataset is not None:
                log.info(dataset.index.report.summary())
        if self.skipped_batches:
            log.warning("%d batches were skipped for non-finite losses", self.skipped_batches)
        log.info("outputs in %s", self.run_dir)
