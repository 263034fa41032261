"""The ``semantic`` task: images with dense or point labels in, accuracy and IoU out, class-index maps exported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from rsiseg.config import ExperimentConfig
from rsiseg.data.semantic import SemanticDataset
from rsiseg.engine.distributed import Distributed
from rsiseg.evaluation.semantic import ConfusionMatrix, format_semantic_table
from rsiseg.inference.display import to_display_rgb
from rsiseg.inference.predictor import iterate_predictions, predict_images
from rsiseg.inference.semantic_output import palette_for, results_figure

METRICS = ("accuracy", "mean_accuracy", "mIoU")


class SemanticTask:
    """Semantic segmentation over folders of images and label maps (``data.train_labels``/``data.val_labels``).

    Training labels are sparse when ``data.points`` draws or reads points; validation labels are
    always dense, so the metrics are over every labelled pixel.
    """

    name = "semantic"

    def metric_names(self, cfg: ExperimentConfig) -> list[str]:
        return [f"semantic/{stat}" for stat in METRICS]

    def build_datasets(self, cfg: ExperimentConfig) -> tuple[SemanticDataset, SemanticDataset | None]:
        data = cfg.data
        if not data.train_images or not data.train_labels:
            raise ValueError("data.train_images and data.train_labels must be set to train a semantic model")
        train = self.dataset(cfg, data.train_images, data.train_labels, train=True)
        if train.num_classes != cfg.model.num_classes:
            raise ValueError(f"model.num_classes is {cfg.model.num_classes} but the labels in {data.train_labels} "
                             f"have {train.num_classes} classes ({', '.join(train.class_names)})")
        val = None
        if data.val_labels:
            val = self.dataset(cfg, data.val_images or data.train_images, data.val_labels, train=False)
        return train, val

    def dataset(self, cfg: ExperimentConfig, images: str, labels: str | None, train: bool = False) -> SemanticDataset:
        """A dataset of ``images`` (and ``labels``) read as ``cfg`` says; ``train`` adds points and augmentation."""
        data = cfg.data
        augment = {"hflip": data.hflip, "vflip": data.vflip, "rot90": data.rot90} if train else {}
        return SemanticDataset(images, labels, in_channels=cfg.model.in_channels, label_format=data.label_format,
                               image_size=data.image_size, points=data.points if train else None,
                               ignore_index=cfg.model.seg.ignore_index, seed=cfg.train.seed, **augment)

    def evaluate(self, model: nn.Module, dataset: SemanticDataset, cfg: ExperimentConfig, device: torch.device,
                 num_workers: int = 0, progress: bool = True, dist: Distributed | None = None) -> dict[str, Any]:
        dist = dist or Distributed()
        matrix = ConfusionMatrix(dataset.num_classes, cfg.model.seg.ignore_index)
        part = Subset(dataset, range(dist.rank, len(dataset), dist.world_size)) if dist.enabled else dataset
        for pred, target, _ in iterate_predictions(model, part, device, cfg.eval.batch_size, num_workers,
                                                   progress, desc="eval"):
            matrix.update(pred["labels"], target["labels"])
        matrix.matrix = sum(dist.gather(matrix.matrix, "gathering the evaluation's confusion matrices"))
        return matrix.metrics(dataset.class_names)

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        return format_semantic_table(metrics)

    def class_record(self, dataset: SemanticDataset) -> dict[str, list]:
        return {"names": dataset.class_names, "category_ids": list(range(dataset.num_classes)),
                "palette": [list(c) for c in palette_for(dataset.class_names, dataset.palette)]}

    def results_figures(self, model: nn.Module, dataset: SemanticDataset, cfg: ExperimentConfig,
                        device: torch.device, out: Path, count: int = 4) -> list[Path]:
        """The report's figure for the first ``count`` images: input, ground truth, points, prediction.

        The points are those ``data.points`` would draw from the ground truth: the annotation budget
        the model was trained with.
        """
        pointed = self.dataset(cfg, str(dataset.images_dir), str(dataset.labels_dir), train=True)
        palette = palette_for(dataset.class_names, dataset.palette)
        written = []
        for idx in range(min(count, len(dataset))):
            image, target = dataset[idx]
            pred = predict_images(model, [image], device)[0]["labels"].numpy()
            rgb = to_display_rgb(image)
            path = out / f"{Path(dataset.names[idx]).stem}.png"
            written.append(results_figure(path, rgb, target["labels"].numpy(), pointed.point_coords(idx), pred,
                                          palette, dataset.class_names))
        return written
