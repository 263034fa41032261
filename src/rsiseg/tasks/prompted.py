"""The ``prompted`` task: every instance prompted by one point; mask IoU, mask AP and point-to-box AP out.

Training data are COCO instances whose targets carry one point per instance
(:class:`~rsiseg.data.point_prompts.PointPromptDataset`), or, for the point-only modes, the images and
points of a point file (``data.train_points``, :class:`~rsiseg.data.point_labels.PointLabelDataset`).
Evaluation prompts every non-crowd
ground-truth instance of the validation set with its point (the ``center`` rule unless
``data.instance_points`` says otherwise), encodes each image once, and scores the answers with
:func:`~rsiseg.evaluation.prompt_metrics.prompted_metrics`: mIoU over instances, COCO mask AP (the
score is the model's predicted IoU) and the box AP and mean box IoU of the masks' boxes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from rsiseg.config import ExperimentConfig
from rsiseg.data.coco import CocoInstanceDataset
from rsiseg.data.loader import collate
from rsiseg.data.point_labels import PointLabelDataset
from rsiseg.data.point_prompts import PointPromptDataset
from rsiseg.data.transforms import build_train_transforms
from rsiseg.engine.distributed import Distributed, gather_sorted
from rsiseg.evaluation.coco import PRESETS
from rsiseg.evaluation.prompt_metrics import format_prompt_metrics, prompt_stat_names, prompted_metrics
from rsiseg.models.sam.model import PROMPT_CHUNK
from rsiseg.structures import mask_to_rle
from rsiseg.tasks.instance import InstanceTask

TrainSet = PointPromptDataset | PointLabelDataset


class PromptedTask:
    """Point-prompted instance segmentation over COCO JSON files (``data.train_ann``/``data.val_ann``), or a
    point file for training (``data.train_points``)."""

    name = "prompted"

    def metric_names(self, cfg: ExperimentConfig) -> list[str]:
        return prompt_stat_names(cfg.eval.max_dets or PRESETS[cfg.eval.preset].max_dets)

    def build_datasets(self, cfg: ExperimentConfig) -> tuple[TrainSet, PointPromptDataset | None]:
        """The instance task's datasets (its checks and training-image filters) with a point per instance; or
        with ``data.train_points``, that file's points on ``data.train_images`` for training."""
        rule, seed = cfg.data.instance_points, cfg.train.seed
        if cfg.data.train_points:
            val = InstanceTask().val_dataset(cfg)
            train: TrainSet = point_label_dataset(cfg, val)
        else:
            base, val = InstanceTask().build_datasets(cfg)
            train = PointPromptDataset(base, rule, seed)
        return train, PointPromptDataset(val, rule, seed) if val is not None else None

    def dataset(self, cfg: ExperimentConfig, ann: str, images: str) -> PointPromptDataset:
        """An evaluation dataset (no augmentation) of ``ann`` read as ``cfg`` says."""
        base = CocoInstanceDataset(ann, images, in_channels=cfg.model.in_channels, repair=cfg.data.repair)
        return PointPromptDataset(base, cfg.data.instance_points, cfg.train.seed)

    def evaluate(self, model: nn.Module, dataset: PointPromptDataset, cfg: ExperimentConfig, device: torch.device,
                 num_workers: int = 0, progress: bool = True, dist: Distributed | None = None) -> dict[str, Any]:
        dist = dist or Distributed()
        results = self.answers(model, dataset, cfg, device, dist, num_workers, progress)
        metrics = self.score(dataset, results, cfg) if dist.is_main else None
        return dist.broadcast(metrics, "sharing the evaluation's metrics")

    def answers(self, model: nn.Module, dataset: PointPromptDataset, cfg: ExperimentConfig, device: torch.device,
                dist: Distributed, num_workers: int = 0, progress: bool = True) -> list[dict[str, Any]]:
        """:func:`answer_dataset` on this rank's share of the images, every rank's answers in annotation order."""
        results = answer_dataset(model, dataset, cfg.eval.batch_size, cfg.eval.mask_threshold, device,
                                 (dist.rank, dist.world_size), num_workers, progress)
        order = {ann["id"]: i for i, ann in enumerate(dataset.index.to_coco()["annotations"])}
        return gather_sorted(dist, results, key=lambda r: order[r["annotation_id"]], what="gathering the answers")

    def score(self, dataset: PointPromptDataset, results: list[dict[str, Any]],
              cfg: ExperimentConfig) -> dict[str, Any]:
        """The prompted metrics of ``results`` against ``dataset``'s checked ground truth."""
        max_dets = tuple(cfg.eval.max_dets) if cfg.eval.max_dets else None
        return prompted_metrics(dataset.index.to_coco(), results, cfg.eval.preset, max_dets)

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        return format_prompt_metrics(metrics)

    def class_record(self, dataset: TrainSet) -> dict[str, list]:
        return {"names": dataset.class_names, "category_ids": dataset.label_to_category}


def point_label_dataset(cfg: ExperimentConfig, val: CocoInstanceDataset | None) -> PointLabelDataset:
    """``data.train_points`` on ``data.train_images``, with the classes (and category ids) of the validation
    file when there is one."""
    data, model = cfg.data, cfg.model
    if not data.train_images:
        raise ValueError("data.train_points needs data.train_images, the folder of the images it names")
    if val is not None and len(val.class_names) != model.num_classes:
        raise ValueError(f"model.num_classes is {model.num_classes} but {val.index.ann_file} has "
                         f"{len(val.class_names)} categories ({', '.join(val.class_names)})")
    train = PointLabelDataset(data.train_points, data.train_images, val.class_names if val else None,
                              model.num_classes, model.in_channels, build_train_transforms(data, model.in_channels),
                              cfg.train.seed)
    if val is not None:
        train.label_to_category = val.label_to_category
    return train


@torch.no_grad()
def answer_dataset(model: nn.Module, dataset: PointPromptDataset, batch_size: int, mask_threshold: float,
                   device: torch.device, shard: tuple[int, int] = (0, 1), num_workers: int = 0,
                   progress: bool = True) -> list[dict[str, Any]]:
    """Prompt every instance of ``dataset`` (this rank's share of the images) with its point.

    Returns:
        One COCO result per instance: ``image_id``, ``annotation_id`` (the instance prompted),
        ``category_id`` (the instance's own: a point prompt names its object's class), ``score``
        (predicted IoU) and ``segmentation`` (compressed RLE of the mask at ``mask_threshold``).
    """
    model.eval()  # a PointSam: encode() then answer() (see rsiseg.models.sam.model)
    rank, world = shard
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    results: list[dict[str, Any]] = []
    positions = iter(indices)
    for images, targets in tqdm(loader, desc="prompted eval", disable=not progress, leave=False):
        encoded = model.encode([image.to(device) for image in images], cache=True)  # once, for all its prompts
        for i, target in enumerate(targets):
            ids = dataset.annotation_ids(next(positions))
            if len(ids) != len(target["points"]):
                raise RuntimeError(f"image {int(target['image_id'])}: {len(target['points'])} prompts for "
                                   f"{len(ids)} annotations")
            # Full-size masks are encoded chunk by chunk: a dense scene never holds all of them at once.
            for start in range(0, len(ids), PROMPT_CHUNK):
                part = slice(start, start + PROMPT_CHUNK)
                answer = model.answer(encoded, i, points=target["points"][part].to(device))
                masks = (answer["masks"][:, 0] > mask_threshold).cpu().numpy()
                for ann_id, mask, label, score in zip(ids[part], masks, target["labels"][part].tolist(),
                                                      answer["scores"].tolist()):
                    results.append({"image_id": int(target["image_id"]), "annotation_id": ann_id,
                                    "category_id": dataset.label_to_category[label - 1], "score": float(score),
                                    "segmentation": mask_to_rle(np.ascontiguousarray(mask))})
    return results
