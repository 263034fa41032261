"""Run logs: ``metrics.jsonl`` (one JSON object a line), TensorBoard and optional W&B scalars, a curves PNG
and log lines.

Weights & Biases is an optional extra: it is imported only when a run asks for it
(``train.wandb: true``), and ``WANDB_MODE=offline`` or ``WANDB_DISABLED`` are left for wandb
itself to honour.
"""

from __future__ import annotations

import datetime
import json
import logging
import secrets
from pathlib import Path
from typing import Any

from rsiseg.fileio import atomic_write

log = logging.getLogger(__name__)

# The evaluation statistics plotted by default, whatever the task: AP and AP50 of each instance IoU type,
# the semantic task's accuracy and mIoU.
CURVE_STATS = ("AP", "AP50", "accuracy", "mIoU")
# The W&B run id of a run directory: a resumed run continues the same W&B run.
WANDB_ID_FILE = "wandb_id.txt"
WANDB_INSTALL_HINT = "install the extra with `uv sync --extra wandb` (or `pip install 'rsiseg[wandb]'`)"


class RunLogger:
    """Appends records to ``metrics.jsonl`` and mirrors their numbers to TensorBoard and, optionally, W&B.

    Each record has ``kind`` (``run``: the facts of a start or resume such as ``world_size``; ``train``;
    ``eval``), ``iteration`` and ``epoch`` plus numbers.
    A resumed run appends to the same file after dropping records past the resume point.
    TensorBoard and W&B get the same scalars: tag ``<kind>/<name>``, step ``iteration``.

    Args:
        run_dir: the run directory.
        tensorboard: write TensorBoard scalars to ``run_dir/tensorboard``.
        resume_iteration: the iteration a resumed run continues from; None starts afresh.
        wandb_project: log to this W&B project as well (None: W&B is not imported). The W&B run
            is named after ``run_dir``, keeps its files in ``run_dir/wandb`` and its id in
            ``run_dir/wandb_id.txt``, so a resumed run continues the same W&B run (W&B drops
            steps it already holds, those past the checkpoint that was resumed from).
        config: the resolved experiment config, recorded as the W&B run's config.

    Raises:
        ImportError: ``wandb_project`` is set but wandb is not installed (the message says how to install it).
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_iteration: int | None = None,
                 wandb_project: str | None = None, config: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = [] if resume_iteration is None else [r for r in read_records(self.path)
                                                     if r["iteration"] <= resume_iteration]
        atomic_write(self.path, lambda fh: fh.write("".join(json.dumps(r) + "\n" for r in kept)))
        self.writer = _tensorboard_writer(self.run_dir / "tensorboard") if tensorboard else None
        self.wandb_run = None
        if wandb_project is not None:
            self.wandb_run = _wandb_run(self.run_dir, wandb_project, config or {}, resume=resume_iteration is not None)

    def write(self, kind: str, iteration: int, epoch: int, values: dict[str, float], mirror: bool = True) -> None:
        """Append a record; ``mirror`` False keeps it out of TensorBoard and W&B (run facts, not curves)."""
        record = {"kind": kind, "iteration": iteration, "epoch": epoch, **values}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if not mirror:
            return
        scalars = {f"{kind}/{key}": value for key, value in values.items() if isinstance(value, (int, float))}
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, iteration)
        if self.wandb_run is not None and scalars:
            self.wandb_run.log(scalars, step=iteration)

    def close(self) -> None:
        """Flush and close the writers; a second call does nothing (Ctrl-C paths may close twice)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a last line cut short by a killed run is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not valid JSON") from None
            log.warning("%s: dropped its last line, cut short by an interrupted run", path)
    return records


def format_progress(iteration: int, total: int, losses: dict[str, float], lr: float, s_per_iter: float,
                    eta_seconds: float) -> str:
    """One log line: ``iter 20/400  loss 1.2340 (loss_classifier 0.310, ...)  lr 1.00e-03  0.85 s/it  ETA 0:05:23``."""
    parts = ", ".join(f"{k} {v:.3f}" for k, v in losses.items() if k != "loss")
    eta = datetime.timedelta(seconds=round(max(0.0, eta_seconds)))
    return (f"iter {iteration}/{total}  loss {losses['loss']:.4f} ({parts})  lr {lr:.2e}  "
            f"{s_per_iter:.2f} s/it  ETA {eta}")


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average; ``weight`` defaults to one that spans about 1/20 of the points."""
    if weight is None:
        weight = 1 - 2 / (max(1, len(values) // 20) + 1)
    out, level = [], None
    for value in values:
        level = value if level is None else weight * level + (1 - weight) * value
        out.append(level)
    return out


def plot_curves(metrics_path: str | Path, out_path: str | Path, metric_keys: list[str] | None = None) -> None:
    """Plot training losses (raw, faint, and smoothed) and evaluation metrics against iterations into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(12, 4.5))
    loss_keys = sorted({k for r in train for k in r if k.startswith("loss")})
    for key in loss_keys:
        steps, values = zip(*[(r["iteration"], r[key]) for r in train if key in r])
        raw = ax_loss.plot(steps, values, linewidth=0.6, alpha=0.25)[0]
        ax_loss.plot(steps, smooth(list(values)), color=raw.get_color(), label=key,
                     linewidth=1.8 if key == "loss" else 1.0)
    ax_loss.set(xlabel="iteration", ylabel="loss", title="training losses (faint: raw; bold: smoothed)",
                yscale="log")
    keys = metric_keys or sorted({k for r in evals for k in r if "/" in k and k.split("/")[1] in CURVE_STATS})
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
    atomic_write(out_path, lambda handle: fig.savefig(handle, format="png", dpi=100), binary=True)
    plt.close(fig)


def _wandb_run(run_dir: Path, project: str, config: dict[str, Any], resume: bool):
    """Start (or, with ``resume`` and a stored id, continue) the W&B run of ``run_dir``."""
    try:
        import wandb
    except ImportError:
        raise ImportError(f"train.wandb is true but wandb is not installed: {WANDB_INSTALL_HINT}, "
                          "or set train.wandb=false") from None
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else ""
    if not run_id:
        # W&B's own ids are 8 characters of [a-z0-9]; a fresh or overwritten run gets a new one.
        run_id = secrets.token_hex(4)
        atomic_write(id_file, lambda fh: fh.write(run_id + "\n"))
    # No mode= here: WANDB_MODE=offline and WANDB_DISABLED are for wandb itself to read.
    return wandb.init(project=project, name=run_dir.resolve().name, dir=str(run_dir), config=config, id=run_id,
                      resume="allow")


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
        log.warning("tensorboard is not importable; scalars go to metrics.jsonl only")
        return None
    return SummaryWriter(log_dir=str(path))
