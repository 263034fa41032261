"""Optimisers with parameter groups, warmup + cosine/step/plateau learning-rate schedules, and two-stage
training (the backbone frozen for the first ``train.freeze_backbone_epochs`` epochs).

Freezing: the stage is a function of the epoch alone, so a run resumed at any iteration is in the stage
the uninterrupted run was. While frozen, the backbone's parameters get no gradient (the optimizer, built
with them, skips them: no update, no weight decay, no momentum) and its batch norms stay in eval mode
(their running statistics do not move). Stages that ``model.trainable_layers`` keeps frozen stay frozen
after the unfreeze. Any model whose feature extractor is at one of :data:`BACKBONE_PATHS` can use it;
the trainer knows no model.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from rsiseg.config import TrainConfig
from rsiseg.evaluation.component_layouts import get_path

log = logging.getLogger(__name__)

NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.SyncBatchNorm)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Split trainable parameters by role: backbone / RoI heads / rest, each with and without decay.

    The backbone and the RoI heads get ``lr * backbone_lr_mult`` and ``lr * roi_heads_lr_mult``;
    norm weights and biases get ``norm_weight_decay``.
    """
    no_decay = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = "backbone" if name.startswith("backbone.body") else "roi_heads" if name.startswith("roi_heads") else "other"
        decay = not (id(param) in no_decay or name.endswith(".bias"))
        groups.setdefault((role, decay), []).append(param)
    mult = {"backbone": cfg.backbone_lr_mult, "roi_heads": cfg.roi_heads_lr_mult, "other": 1.0}
    return [
        {
            "params": params,
            "lr": cfg.lr * mult[role],
            "weight_decay": cfg.weight_decay if decay else cfg.norm_weight_decay,
            "name": f"{role}{'' if decay else '_no_decay'}",
        }
        for (role, decay), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum), Adam (L2 weight decay added to the gradient) or AdamW (decoupled) over :func:`param_groups`."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"train.optimizer must be one of sgd, adam, adamw, got {cfg.optimizer!r}")


class LRSchedule:
    """Per-iteration warmup and decay, plus ReduceLROnPlateau driven by an evaluation metric.

    ``cosine`` and ``step`` decay per iteration through a LambdaLR; ``plateau`` holds the lr
    after warmup and lets :class:`torch.optim.lr_scheduler.ReduceLROnPlateau` cut it when the
    chosen metric stalls; ``constant`` only warms up.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, iters_per_epoch: int, total_iters: int) -> None:
        if cfg.scheduler not in ("cosine", "step", "plateau", "constant"):
            raise ValueError(f"train.scheduler must be cosine, step, plateau or constant, got {cfg.scheduler!r}")
        self.cfg, self.iters_per_epoch, self.total_iters = cfg, max(1, iters_per_epoch), max(1, total_iters)
        self.iteration = 0
        self.lambda_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)
        self.plateau = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=cfg.plateau_mode, factor=cfg.plateau_factor, patience=cfg.plateau_patience,
                min_lr=cfg.plateau_min_lr,
            )
            if cfg.scheduler == "plateau"
            else None
        )

    def factor(self, iteration: int) -> float:
        """Multiplier of the base lr at ``iteration`` (warmup times decay)."""
        cfg = self.cfg
        warm = 1.0
        if iteration < cfg.warmup_iters:
            alpha = iteration / cfg.warmup_iters
            warm = cfg.warmup_factor * (1 - alpha) + alpha
        if cfg.scheduler == "cosine":
            progress = min(1.0, iteration / self.total_iters)
            decay = cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        elif cfg.scheduler == "step":
            epoch = iteration / self.iters_per_epoch
            decay = cfg.step_gamma ** sum(epoch >= e for e in cfg.step_epochs)
        else:
            decay = 1.0
        return warm * decay

    def step(self) -> None:
        """Advance one iteration."""
        self.iteration += 1
        if self.plateau is None or self.iteration <= self.cfg.warmup_iters:
            # After warmup the plateau scheduler owns the lr; LambdaLR would overwrite its cuts.
            self.lambda_lr.step()

    def step_metric(self, value: float) -> None:
        """Feed an evaluation result to ReduceLROnPlateau (ignored during warmup or for other schedules)."""
        if self.plateau is not None and self.iteration > self.cfg.warmup_iters and math.isfinite(value):
            self.plateau.step(value)

    def restart_at(self, iteration: int, lr_factor: float = 1.0) -> None:
        """Continue from ``iteration`` with every base lr times ``lr_factor`` (a resume on another number of
        processes: its iterations count other global batches, and linear scaling changes the lr)."""
        self.iteration = iteration
        optimizer = self.lambda_lr.optimizer
        self.lambda_lr.base_lrs = [lr * lr_factor for lr in self.lambda_lr.base_lrs]
        for group, base in zip(optimizer.param_groups, self.lambda_lr.base_lrs):
            group["initial_lr"] = base
            group["lr"] = base * self.factor(iteration) if self.plateau is None else group["lr"] * lr_factor
        self.lambda_lr.last_epoch = iteration

    def state_dict(self) -> dict[str, Any]:
        state = {"iteration": self.iteration, "lambda_lr": self.lambda_lr.state_dict()}
        state["lambda_lr"].pop("lr_lambdas", None)
        if self.plateau is not None:
            state["plateau"] = self.plateau.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = state["iteration"]
        self.lambda_lr.load_state_dict({**state["lambda_lr"], "lr_lambdas": [None] * len(self.lambda_lr.lr_lambdas)})
        if self.plateau is not None and "plateau" in state:
            self.plateau.load_state_dict(state["plateau"])


# Where models keep their (usually pretrained) feature extractor: R-CNNs and YOLACT, the semantic model.
BACKBONE_PATHS = ("backbone.body", "encoder")


def backbone_of(model: nn.Module) -> nn.Module | None:
    """The model's feature extractor (the first of :data:`BACKBONE_PATHS` it has), or None."""
    return next((found for found in (get_path(model, path) for path in BACKBONE_PATHS) if found is not None), None)


class BackboneFreeze:
    """Freezes and unfreezes a model's backbone by epoch.

    Args:
        model: the model being trained.
        epochs: the first stage's length in epochs (0: never frozen).

    Raises:
        ValueError: ``epochs > 0`` and the model has no backbone at :data:`BACKBONE_PATHS`.
    """

    def __init__(self, model: nn.Module, epochs: int) -> None:
        self.epochs = epochs
        body = backbone_of(model) if epochs else None
        if epochs and body is None:
            raise ValueError(f"train.freeze_backbone_epochs = {epochs} needs a model with a backbone at one of "
                             f"{', '.join(BACKBONE_PATHS)}; {type(model).__name__} has none")
        self.params = [p for p in body.parameters() if p.requires_grad] if body is not None else []
        self.norms = [m for m in body.modules() if isinstance(m, _BatchNorm)] if body is not None else []
        self.frozen = False

    def set_epoch(self, epoch: int) -> None:
        """Enter the stage of ``epoch`` (0-based): frozen while ``epoch < epochs``."""
        frozen = epoch < self.epochs
        if frozen == self.frozen:
            return
        for param in self.params:
            param.requires_grad_(not frozen)
        self.frozen = frozen
        log.info("epoch %d: backbone %s (%d parameter tensors)", epoch, "frozen" if frozen else "unfrozen",
                 len(self.params))

    def hold_norms(self) -> None:
        """Keep a frozen backbone's batch norms in eval mode; call after ``model.train()``."""
        if self.frozen:
            for norm in self.norms:
                norm.eval()
