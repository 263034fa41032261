"""Semantic segmentation metrics from a confusion matrix: pixel accuracy, per-class IoU, mIoU.

Values are fractions in [0, 1]. A class absent from both the predictions and the ground truth has
an undefined IoU (``None``) and is left out of the mIoU and the mean accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rsiseg.evaluation.metrics import percent


class ConfusionMatrix:
    """Pixel counts ``[K, K]`` of (true class, predicted class), accumulated image by image.

    Args:
        num_classes: K.
        ignore_index: ground-truth value of pixels left out (unlabelled / undefined).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one image: ``pred`` and ``target`` int64 ``[H, W]`` class indices (``target`` may hold ``ignore_index``).

        Raises:
            ValueError: different shapes, or values outside ``0..K-1`` (the ignore index aside).
        """
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(target.shape)} differ in size")
        keep = target != self.ignore_index
        pred, target = pred[keep].to("cpu", torch.int64), target[keep].to("cpu", torch.int64)
        k = self.num_classes
        for name, values in (("prediction", pred), ("ground truth", target)):
            if values.numel() and (values.min() < 0 or values.max() >= k):
                raise ValueError(f"{name} holds class indices outside 0..{k - 1}")
        self.matrix += torch.bincount(target * k + pred, minlength=k * k).view(k, k)

    def metrics(self, class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """``{"semantic": {"accuracy", "mIoU", "mean_accuracy", "per_class_IoU": {name: IoU | None}}}``.

        ``accuracy`` is the share of evaluated pixels predicted right; ``mean_accuracy`` averages the
        per-class recall over the classes in the ground truth; ``mIoU`` averages the defined IoUs.
        Undefined summaries (nothing evaluated) are ``None``.
        """
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        m = self.matrix.double()
        tp, gt, pred = m.diag(), m.sum(dim=1), m.sum(dim=0)
        union = gt + pred - tp
        iou = [float(tp[c] / union[c]) if union[c] > 0 else None for c in range(self.num_classes)]
        recall = [float(tp[c] / gt[c]) for c in range(self.num_classes) if gt[c] > 0]
        defined = [v for v in iou if v is not None]
        total = float(m.sum())
        return {"semantic": {
            "accuracy": float(tp.sum()) / total if total else None,
            "mIoU": sum(defined) / len(defined) if defined else None,
            "mean_accuracy": sum(recall) / len(recall) if recall else None,
            "per_class_IoU": dict(zip(class_names, iou)),
        }}


def format_semantic_table(metrics: dict[str, dict[str, Any]]) -> str:
    """A markdown table of :meth:`ConfusionMatrix.metrics`: the summaries, then the IoU of each class (percent)."""
    stats = metrics["semantic"]
    rows = [("accuracy", stats["accuracy"]), ("mean accuracy", stats["mean_accuracy"]), ("mIoU", stats["mIoU"])]
    rows += [(f"IoU {name}", value) for name, value in stats["per_class_IoU"].items()]
    lines = ["| metric | % |", "|---|---:|"]
    lines += [f"| {name} | {percent(value)} |" for name, value in rows]
    return "\n".join(lines)
