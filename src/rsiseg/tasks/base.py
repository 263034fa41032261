"""The task interface: what the trainer needs to know of the data, the metric and the outputs.

A task builds the datasets, evaluates a model and formats its metrics; the trainer takes one and
knows nothing of any one task (``grep -i coco src/rsiseg/engine/`` finds nothing). Datasets of
every task follow one contract: items ``(image float [C, H, W] in [0, 1], target dict)``, keys
``index`` or ``(index, epoch)`` (the epoch seeds the augmentation, see
:mod:`rsiseg.engine.sampler`), a ``class_names`` list and a ``summary()`` line for the log.
Models of every task take ``(images, targets)`` in training and return a dict of named losses.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from rsiseg.config import ExperimentConfig
from rsiseg.engine.distributed import Distributed


class TaskDataset(Protocol):
    """What the trainer reads of a dataset besides ``__len__`` and ``__getitem__``."""

    @property
    def class_names(self) -> list[str]: ...

    def summary(self) -> str: ...

    def __len__(self) -> int: ...

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]: ...


class Task(Protocol):
    """One task: ``instance``, ``semantic`` or ``prompted``."""

    name: str

    def metric_names(self, cfg: ExperimentConfig) -> list[str]:
        """The ``"<group>/<stat>"`` names :meth:`evaluate` produces under ``cfg`` (checked before training)."""
        ...

    def build_datasets(self, cfg: ExperimentConfig) -> tuple[TaskDataset, TaskDataset | None]:
        """The augmented training set and the validation set (None when ``cfg`` names none).

        Raises:
            ValueError: missing paths, or data whose classes do not match ``model.num_classes``.
        """
        ...

    def evaluate(self, model: nn.Module, dataset: TaskDataset, cfg: ExperimentConfig, device: torch.device,
                 num_workers: int = 0, progress: bool = True, dist: Distributed | None = None) -> dict[str, Any]:
        """Metrics ``{group: {stat: value}}`` of ``model`` on ``dataset``.

        With ``dist`` (a distributed run), each rank predicts its share of the items and every rank returns
        the metrics of the whole set, equal to those of one process."""
        ...

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        """Markdown tables of ``metrics`` for the log and ``metrics.md``."""
        ...

    def class_record(self, dataset: TaskDataset) -> dict[str, list]:
        """What a checkpoint stores under ``classes`` to name the model's outputs later."""
        ...
