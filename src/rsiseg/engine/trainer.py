"""The training loop: iterations, evaluation, checkpoints, exact resume.

A run directory holds ``config.yaml`` (the resolved config), ``last.pth`` and ``best.pth``,
``metrics.jsonl``, ``tensorboard/`` and ``curves.png``. ``train.freeze_backbone_epochs`` trains in
two stages (:class:`rsiseg.engine.optim.BackboneFreeze`). ``resume=True`` continues from
``last.pth`` with the same iteration, optimizer, scheduler, scaler and RNG state; the data
order is a function of (seed, epoch) and augmentation draws of (seed, epoch, index), so a
resumed run sees exactly the batches the uninterrupted run would have seen.

Before anything is loaded, :func:`rsiseg.engine.preflight.preflight` checks metric names, the
device, the output folder and the resume checkpoint; a folder holding a previous run is refused
unless ``resume`` or ``overwrite``. ``train.time_budget`` ends a run early with ``last.pth`` and
a final evaluation. Ctrl-C raises :class:`TrainingInterrupted`, whose message names the last
checkpoint; every file is written atomically, so nothing is left half-written.

Under ``torchrun`` the same loop runs on every process (:mod:`rsiseg.engine.distributed`): each rank
takes its share of every global batch, DistributedDataParallel averages the gradients, and rank 0
alone logs and writes files. Checkpoints record ``world_size`` and every rank's RNG state.
"""

from __future__ import annotations

import contextlib
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
from tqdm.contrib.logging import logging_redirect_tqdm

from rsiseg.checkpoint import rng_state, save_checkpoint, set_rng_state
from rsiseg.config import ExperimentConfig, dump_config, to_dict
from rsiseg.data.loader import collate, resolve_num_workers
from rsiseg.engine.distributed import (
    Distributed,
    NullLogger,
    init_distributed,
    is_collective_failure,
    rank_device_name,
    resume_position,
    scaled_train_config,
    wrap_model,
)
from rsiseg.engine.logging import RunLogger, format_progress, plot_curves
from rsiseg.engine.optim import BackboneFreeze, LRSchedule, build_optimizer
from rsiseg.engine.preflight import preflight, prepare_run_dir
from rsiseg.engine.sampler import EpochBatchSampler
from rsiseg.evaluation.metrics import metric_value, write_metrics
from rsiseg.inference.predictor import select_device
from rsiseg.models.registry import build_model
from rsiseg.tasks import get_task

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :meth:`Trainer.fit`; the message says where the last checkpoint is."""


class Trainer:
    """Trains the model an :class:`ExperimentConfig` describes.

    Args:
        cfg: the resolved experiment config.
        resume: continue from ``<output_dir>/last.pth``.
        progress: show tqdm bars.
        overwrite: replace a previous run in ``output_dir`` (without it, such a folder is refused).

    Raises:
        ConfigError, ValueError, OSError: a preflight check failed; nothing was written.
    """

    def __init__(self, cfg: ExperimentConfig, resume: bool = False, progress: bool = True,
                 overwrite: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        self.dist: Distributed = init_distributed(cfg.train.device, cfg.train.dist_timeout)
        self.progress = progress and self.dist.is_main
        if not self.dist.is_main:  # one process speaks for the run
            logging.getLogger("rsiseg").setLevel(logging.WARNING)
        # Rank 0 checks first (the writability probe creates and removes files), then the others; every rank has
        # checked the folder before rank 0 prepares it (after the model's DDP construction, a collective).
        resume_state = self.dist.main_first(lambda: preflight(cfg, resume=resume, overwrite=overwrite), "preflight")
        self.task = get_task(cfg.task)
        self.device = select_device(rank_device_name(self.dist, cfg.train.device))
        seed_everything(cfg.train.seed)
        self.train_set, self.val_set = self.task.build_datasets(cfg)
        self.num_workers = resolve_num_workers(cfg.data.num_workers)
        self.sampler = EpochBatchSampler(len(self.train_set), cfg.train.batch_size, cfg.train.seed, self.dist.rank,
                                         self.dist.world_size)
        # One loader for the whole run: persistent workers are started once, not every epoch. Its own
        # generator keeps the loader from drawing on the global RNG, which exact resume restores.
        self.loader = DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=self.num_workers,
                                 collate_fn=collate, persistent_workers=self.num_workers > 0,
                                 pin_memory=self.device.type == "cuda",
                                 generator=torch.Generator().manual_seed(cfg.train.seed))
        # self.model is the model itself (state dicts, evaluation); self.net what training calls (DDP when distributed).
        self.model, self.net = wrap_model(build_model(cfg.model), self.dist, self.device, cfg.train.sync_bn)
        train_cfg = scaled_train_config(cfg.train, self.dist.world_size)  # lr x processes with lr_scaling linear
        self.optimizer = build_optimizer(self.model, train_cfg)
        # Built after the optimizer, which must hold every parameter, the first stage's frozen ones included.
        self.freeze = BackboneFreeze(self.model, cfg.train.freeze_backbone_epochs)
        self.iters_per_epoch = len(self.sampler)  # global batches of an epoch (no skip yet)
        total = cfg.train.epochs * self.iters_per_epoch
        self.total_iters = min(total, cfg.train.max_iters) if cfg.train.max_iters else total
        self.schedule = LRSchedule(self.optimizer, train_cfg, self.iters_per_epoch, self.total_iters)
        self.use_amp = cfg.train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.iteration, self.epoch, self.skipped_batches = 0, 0, 0
        self.best: float | None = None
        self.last_metrics: dict[str, Any] = {}
        self.saved_iteration: int | None = None  # of the newest last.pth
        self.stopped_by_budget = False
        self.started = time.monotonic()
        self.pace = {"seconds": 0.0, "iters": 0, "window_seconds": 0.0, "window_iters": 0}
        if resume_state is not None:
            self._resume(resume_state)
        self.logger: RunLogger | NullLogger = NullLogger()
        if self.dist.is_main:
            prepare_run_dir(self.run_dir, overwrite)
            if not resume:
                dump_config(cfg, self.run_dir / "config.yaml")
            self.logger = RunLogger(self.run_dir, cfg.train.tensorboard, self.iteration if resume else None,
                                    cfg.train.wandb_project if cfg.train.wandb else None, to_dict(cfg))
            self.logger.write("run", self.iteration, self.epoch, {"world_size": self.dist.world_size,
                                                                  "global_batch": cfg.train.batch_size * self.dist.world_size},
                              mirror=False)
        self.dist.barrier("run folder")

    def fit(self) -> dict[str, Any]:
        """Train to the end (or the time budget) and return the last evaluation metrics.

        Raises:
            TrainingInterrupted: on Ctrl-C; its message names the last checkpoint.
        """
        budget = self.cfg.train.time_budget
        log.info("training %s for %d iterations (%d per epoch) on %s%s%s", self.cfg.model.name, self.total_iters,
                 self.iters_per_epoch, self.device, f", time budget {budget:g} min" if budget else "",
                 f", {self.dist.world_size} processes ({self.dist.backend})" if self.dist.enabled else "")
        self.started = time.monotonic()
        bar = tqdm(total=self.total_iters, initial=self.iteration, desc="train", disable=not self.progress,
                   dynamic_ncols=True)
        try:
            # Log lines go through tqdm.write so that they do not break the bar.
            with logging_redirect_tqdm() if self.progress else contextlib.nullcontext():
                evaluated_at = self._train_loop(bar)
            bar.close()
            if self.stopped_by_budget:
                log.info("time budget of %g min spent: stopped at iteration %d of %d, checkpoint %s", budget,
                         self.iteration, self.total_iters, self.run_dir / "last.pth")
            if self.val_set is not None and evaluated_at != self.iteration:
                self.evaluate(scheduled=False)
            if self.saved_iteration != self.iteration:  # a resume on another process count past max_iters
                self.save("last.pth")
            self._finish()
        except KeyboardInterrupt:
            self.logger.close()
            raise TrainingInterrupted(self._interrupted_message()) from None
        except RuntimeError as err:  # a collective inside DDP (the gradient all-reduce) fails when a peer is gone
            if not (self.dist.enabled and is_collective_failure(err)):
                raise
            self.logger.close()
            raise self.dist.failure(f"iteration {self.iteration}: a DistributedDataParallel step", err) from None
        finally:
            bar.close()
        return self.last_metrics

    def _train_loop(self, bar: tqdm) -> int:
        """Epochs with their evaluations and checkpoints; returns the iteration last evaluated at."""
        cfg = self.cfg.train
        evaluated_at, first = -1, self.iteration
        # At least one iteration, so that even a budget spent at once ends with a checkpoint.
        while self.iteration < self.total_iters and not (self.iteration > first and self._out_of_time()):
            self._train_epoch(bar)
            finished_epoch = self.iteration % self.iters_per_epoch == 0
            if finished_epoch:
                self.epoch += 1
            due = cfg.eval_interval > 0 and finished_epoch and self.epoch % cfg.eval_interval == 0
            last = self.iteration >= self.total_iters or self._out_of_time()
            if self.val_set is not None and (due or last):
                self.evaluate(scheduled=due or self.iteration >= self.total_iters)
                evaluated_at = self.iteration
            self.save("last.pth")
        return evaluated_at

    def train_step(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, float] | None:
        """One optimisation step; returns the losses, or None when a non-finite loss skipped it."""
        self.net.train()
        self.freeze.hold_norms()
        images = [img.to(self.device, non_blocking=True) for img in images]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(self.device.type, enabled=self.use_amp):
            losses = self.net(images, targets)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        # Every rank skips together: a rank left alone in the gradient all-reduce would wait forever.
        if self.dist.agree(not torch.isfinite(total), f"iteration {self.iteration}: the non-finite-loss check"):
            self.skipped_batches += 1
            log.warning("iteration %d: non-finite loss %s, batch skipped (%d so far)", self.iteration,
                        {k: v.item() for k, v in losses.items()}, self.skipped_batches)
            if self.dist.enabled:  # DDP expects a backward after each forward: a zero one, whose gradients are dropped
                (torch.nan_to_num(total) * 0).backward()
                self.optimizer.zero_grad(set_to_none=True)
            return None
        self.scaler.scale(total).backward()
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self.dist.mean({"loss": total.item(), **{k: v.item() for k, v in losses.items()}},
                              f"iteration {self.iteration}: the loss average")

    def evaluate(self, scheduled: bool = True) -> dict[str, Any]:
        """Evaluate on the validation split (the task's metrics), log, keep the best checkpoint, feed the scheduler.

        ``scheduled=False`` (an evaluation the schedule does not have: the time budget's, or one after no
        training) leaves the scheduler alone, so that a run continued after the budget cut it takes the
        learning rates of the uninterrupted run (``plateau`` counts its evaluations); it may still make a
        new ``best.pth``.

        Distributed: every rank evaluates its share of the images and every rank gets the same metrics
        (the task gathers them), so all take the same scheduler step and best-checkpoint decision."""
        metrics = self.task.evaluate(self.model, self.val_set, self.cfg, self.device, self.num_workers, self.progress,
                                     dist=self.dist)
        self.last_metrics = metrics
        flat = {f"{t}/{k}": v for t, m in metrics.items() for k, v in m.items() if isinstance(v, (int, float))}
        self.logger.write("eval", self.iteration, self.epoch, flat)
        value = metric_value(metrics, self.cfg.train.best_metric)
        if scheduled:
            self.schedule.step_metric(metric_value(metrics, self.cfg.train.plateau_metric)
                                      if self.cfg.train.scheduler == "plateau" else value)
        log.info("iteration %d: %s = %.4f", self.iteration, self.cfg.train.best_metric, value)
        if math.isfinite(value) and (self.best is None or value > self.best):
            self.best = value
            self.save("best.pth")
            write_metrics(metrics, self.run_dir / "best_metrics.json")
        return metrics

    def save(self, name: str) -> None:
        """Write a checkpoint (rank 0); a collective: every rank calls it, to hand in its RNG state."""
        rank_states = self.dist.gather(rng_state(), f"iteration {self.iteration}: saving {name}")
        if name == "last.pth":  # on every rank: fit() decides by it whether to save again, a collective
            self.saved_iteration = self.iteration
        if not self.dist.is_main:
            return
        save_checkpoint(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": self.epoch,
                "iteration": self.iteration,
                "total_iterations": self.total_iters,  # the schedule's length: a run the time budget cut says so
                "rng_state": rank_states[0],
                "rank_rng_states": rank_states,
                "world_size": self.dist.world_size,
                "config": to_dict(self.cfg),
                "metrics": {"best": self.best, "skipped_batches": self.skipped_batches},
                "classes": self.task.class_record(self.train_set),
            },
            self.run_dir / name,
        )

    def _train_epoch(self, bar: tqdm) -> None:
        cfg = self.cfg.train
        self.sampler.set_epoch(self.epoch, skip=self.iteration - self.epoch * self.iters_per_epoch)
        self.freeze.set_epoch(self.epoch)
        started = time.perf_counter()
        for images, targets in self.loader:
            losses = self.train_step(images, targets)
            self.schedule.step()
            self.iteration += 1
            bar.update(1)
            self._clock(time.perf_counter() - started)  # the step and the wait for its batch
            if losses is not None:
                bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{self._lr():.2e}", refresh=False)
                if self.iteration % cfg.log_interval == 0 or self.iteration == 1:
                    self._log_progress(losses, len(images))
            started = time.perf_counter()
            if cfg.checkpoint_interval and self.iteration % cfg.checkpoint_interval == 0:
                self.save("last.pth")
            if self.iteration >= self.total_iters or self._out_of_time():
                break

    def _clock(self, seconds: float) -> None:
        for key in ("seconds", "window_seconds"):
            self.pace[key] += seconds
        for key in ("iters", "window_iters"):
            self.pace[key] += 1

    def _log_progress(self, losses: dict[str, float], batch: int) -> None:
        """A log line and a ``train`` record: losses, lr, s/iter (since the last line) and the ETA."""
        pace = self.pace
        s_per_iter = pace["window_seconds"] / max(1, pace["window_iters"])
        eta = (self.total_iters - self.iteration) * pace["seconds"] / max(1, pace["iters"])
        if self.cfg.train.time_budget:
            eta = min(eta, max(0.0, self.cfg.train.time_budget * 60 - (time.monotonic() - self.started)))
        log.info(format_progress(self.iteration, self.total_iters, losses, self._lr(), s_per_iter, eta))
        self.logger.write("train", self.iteration, self.epoch,
                          {**losses, "lr": self._lr(), "s_per_iter": s_per_iter, "s_per_img": s_per_iter / batch})
        pace["window_seconds"], pace["window_iters"] = 0.0, 0

    def _out_of_time(self) -> bool:
        budget = self.cfg.train.time_budget
        if budget is not None and not self.stopped_by_budget:  # the ranks' clocks differ: they agree to stop
            spent = time.monotonic() - self.started >= budget * 60
            self.stopped_by_budget = self.dist.agree(spent, f"iteration {self.iteration}: the time-budget check")
        return self.stopped_by_budget

    def _interrupted_message(self) -> str:
        where = f"interrupted at iteration {self.iteration} of {self.total_iters}"
        if self.saved_iteration is None:
            return f"{where}; no checkpoint was written yet (start again with --overwrite)"
        return (f"{where}; last checkpoint: {self.run_dir / 'last.pth'} (iteration {self.saved_iteration}); "
                "continue with --resume")

    def _lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def _resume(self, state: dict[str, Any]) -> None:
        path = self.run_dir / "last.pth"
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iteration = state["epoch"], state["iteration"]
        self.saved_iteration = self.iteration
        self.best = state["metrics"].get("best")
        self.skipped_batches = state["metrics"].get("skipped_batches", 0)
        saved_world, ranks = state.get("world_size", 1), state.get("rank_rng_states")
        if saved_world == self.dist.world_size:
            set_rng_state(ranks[self.dist.rank] if ranks else state["rng_state"])
        else:  # another process count: the same epoch and images done, rank 0's RNG, the lr rescaled
            set_rng_state(state["rng_state"])
            self.iteration = resume_position(self.epoch, self.iteration, len(self.train_set), self.cfg.train.batch_size,
                                             saved_world, self.dist.world_size)
            self.schedule.restart_at(self.iteration, lr_factor=scaled_train_config(self.cfg.train, self.dist.world_size).lr
                                     / scaled_train_config(self.cfg.train, saved_world).lr)
            log.warning("resumed a %d-process checkpoint on %d processes at iteration %d (epoch %d): the batches differ "
                        "from an uninterrupted run from here on", saved_world, self.dist.world_size, self.iteration,
                        self.epoch)
        log.info("resumed from %s at iteration %d (epoch %d)", path, self.iteration, self.epoch)

    def _finish(self) -> None:
        self.logger.close()
        if not self.dist.is_main:
            return
        plot_curves(self.logger.path, self.run_dir / "curves.png")
        if self.last_metrics:
            write_metrics(self.last_metrics, self.run_dir / "metrics.json")
            log.info("final metrics:\n%s", self.task.format_metrics(self.last_metrics))
        for dataset in (self.train_set, self.val_set):
            if dataset is not None:
                log.info(dataset.summary())
        if self.skipped_batches:
            log.warning("%d batches were skipped for non-finite losses", self.skipped_batches)
        log.info("outputs in %s", self.run_dir)
