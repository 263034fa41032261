"""Run logs: ``metrics.jsonl`` (one JSON object a line), TensorBoard scalars and a curves PNG."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RunLogger:
    """Appends records to ``metrics.jsonl`` and mirrors their numbers to TensorBoard.

    Each record has ``kind`` (``train`` or ``eval``), ``iteration`` and ``epoch`` plus numbers.
    A resumed run appends to the same file after dropping records past the resume point.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_iteration: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_iteration is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_records(self.path) if r["iteration"] <= resume_iteration]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.writer = _tensorboard_writer(self.run_dir / "tensorboard") if tensorboard else None

    def write(self, kind: str, iteration: int, epoch: int, values: dict[str, float]) -> None:
        record = {"kind": kind, "iteration": iteration, "epoch": epoch, **values}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: str | Path, out_path: str | Path, metric_keys: list[str] | None = None) -> None:
    """Plot training losses and evaluation metrics against iterations into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(12, 4.5))
    loss_keys = sorted({k for r in train for k in r if k.startswith("loss")})
    for key in loss_keys:
        pts = [(r["iteration"], r[key]) for r in train if key in r]
        ax_loss.plot(*zip(*pts), label=key, linewidth=1.5 if key == "loss" else 0.8)
    ax_loss.set(xlabel="iteration", ylabel="loss", title="training losses", yscale="log")
    keys = metric_keys or sorted({k for r in evals for k in r if "/" in k and k.split("/")[1] in ("AP", "AP50")})
    for key in keys:
        pts = [(r["iteration"], r[key]) for r in evals if r.get(key) is not None]
        if pts:
            ax_metric.plot(*zip(*pts), marker="o", label=key)
    ax_metric.set(xlabel="iteration", ylabel="value", title="evaluation", ylim=(0, 1))
    for ax in (ax_loss, ax_metric):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
        log.warning("tensorboard is not importable; scalars go to metrics.jsonl only")
        return None
    return SummaryWriter(log_dir=str(path))
