"""The ``instance`` task: COCO instances in, COCO bbox/segm AP out, COCO RLE results exported."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from rsiseg.config import EvalConfig, ExperimentConfig
from rsiseg.data.coco import CocoInstanceDataset
from rsiseg.data.filters import filter_training_images
from rsiseg.data.transforms import build_train_transforms
from rsiseg.engine.distributed import Distributed, gather_sorted
from rsiseg.evaluation.coco import PRESETS, format_metrics_table, stat_names
from rsiseg.inference.predictor import predict_dataset, score_results

log = logging.getLogger(__name__)


class InstanceTask:
    """Instance segmentation over COCO JSON files (``data.train_ann``/``data.val_ann``)."""

    name = "instance"

    def metric_names(self, cfg: ExperimentConfig) -> list[str]:
        max_dets = cfg.eval.max_dets or PRESETS[cfg.eval.preset].max_dets
        return [f"{iou_type}/{stat}" for iou_type in cfg.eval.iou_types for stat in stat_names(max_dets)]

    def build_datasets(self, cfg: ExperimentConfig) -> tuple[CocoInstanceDataset, CocoInstanceDataset | None]:
        data, channels = cfg.data, cfg.model.in_channels
        if not data.train_ann or not data.train_images:
            raise ValueError("data.train_ann and data.train_images must be set to train")
        train = CocoInstanceDataset(data.train_ann, data.train_images, in_channels=channels, repair=data.repair,
                                    transforms=build_train_transforms(data, channels), seed=cfg.train.seed)
        if data.max_instances is not None or data.max_empty_fraction is not None:
            log.info(filter_training_images(train.index, data.max_instances, data.max_empty_fraction, cfg.train.seed))
        found = len(train.class_names)
        if found != cfg.model.num_classes:
            raise ValueError(f"model.num_classes is {cfg.model.num_classes} but {train.index.ann_file} "
                             f"has {found} categories ({', '.join(train.class_names)})")
        return train, self.val_dataset(cfg)

    def val_dataset(self, cfg: ExperimentConfig) -> CocoInstanceDataset | None:
        """``data.val_ann``'s images (in ``data.val_images``, else ``data.train_images``), or None."""
        data = cfg.data
        if not data.val_ann:
            return None
        return CocoInstanceDataset(data.val_ann, data.val_images or data.train_images,
                                   in_channels=cfg.model.in_channels, repair=data.repair)

    def evaluate(self, model: nn.Module, dataset: CocoInstanceDataset, cfg: ExperimentConfig, device: torch.device,
                 num_workers: int = 0, progress: bool = True, dist: Distributed | None = None) -> dict[str, Any]:
        dist = dist or Distributed()
        results = predict_sharded(model, dataset, cfg.eval, device, dist, num_workers, progress)
        metrics = score_results(dataset, results, cfg.eval) if dist.is_main else None
        return dist.broadcast(metrics, "sharing the evaluation's metrics")

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        return format_metrics_table(metrics)

    def class_record(self, dataset: CocoInstanceDataset) -> dict[str, list]:
        return {"names": dataset.class_names, "category_ids": dataset.label_to_category}


def predict_sharded(model: nn.Module, dataset: CocoInstanceDataset, eval_cfg: EvalConfig, device: torch.device,
                    dist: Distributed, num_workers: int = 0, progress: bool = True,
                    label_to_category: list[int] | None = None) -> list[dict[str, Any]]:
    """:func:`~rsiseg.inference.predictor.predict_dataset` on this rank's share of the images (every N-th),
    every rank's results merged in the dataset's image order: the list one process gives, on every rank."""
    results = predict_dataset(model, dataset, eval_cfg, device, num_workers, progress, label_to_category,
                              shard=(dist.rank, dist.world_size))
    position = {info["id"]: i for i, info in enumerate(dataset.index.images)}
    return gather_sorted(dist, results, key=lambda r: position[r["image_id"]], what="gathering the predictions")
