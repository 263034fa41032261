"""Checks a training run makes in its first second, before any data loading or iteration.

A typo in a metric name, a device the machine lacks, an output folder that cannot be written,
a previous run about to be overwritten or a checkpoint that does not fit the model would
otherwise surface after an epoch of training, or silently destroy earlier results.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from rsiseg.checkpoint import load_checkpoint
from rsiseg.config import ConfigError, ExperimentConfig, ModelConfig, TrainConfig, to_dict
from rsiseg.engine.logging import WANDB_ID_FILE, WANDB_INSTALL_HINT
from rsiseg.fileio import remove_path, remove_stale_temp_files
from rsiseg.models.registry import MODELS
from rsiseg.tasks import get_task

log = logging.getLogger(__name__)

# What a run writes into train.output_dir; --overwrite removes exactly these.
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pth", "best.pth", "metrics.json", "best_metrics.json",
             "curves.png", "tensorboard", "wandb", WANDB_ID_FILE)
# Their presence means the folder holds a previous run.
RUN_MARKERS = ("last.pth", "metrics.jsonl")


def preflight(cfg: ExperimentConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any] | None:
    """Run every check; nothing is written or deleted.

    Returns:
        The loaded ``last.pth`` when ``resume``, else None.

    Raises:
        ConfigError: a config value that cannot work (the message names the key).
        FileNotFoundError, FileExistsError, ValueError: a file at fault, named in the message.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: --resume continues the run in "
                         f"{cfg.train.output_dir}, --overwrite replaces it")
    if cfg.model.name not in MODELS:
        raise ConfigError(f"model.name = {cfg.model.name!r} is not a registered model; choose one of "
                          f"{', '.join(sorted(MODELS))}")
    tasks = MODELS[cfg.model.name].tasks
    if cfg.task not in tasks:
        raise ConfigError(f"task = {cfg.task!r} but model.name = {cfg.model.name!r} is a model for the "
                          f"{' and '.join(tasks)} task; set task: {tasks[0]}")
    check_metric_names(cfg)
    check_device(cfg.train.device)
    check_backbone_checkpoint(cfg.model)
    check_wandb(cfg.train)
    run_dir = Path(cfg.train.output_dir)
    check_writable(run_dir)
    if resume:
        return load_resume_checkpoint(cfg, run_dir)
    check_no_previous_run(run_dir, overwrite)
    return None


def check_metric_names(cfg: ExperimentConfig) -> None:
    """``train.best_metric`` (and ``train.plateau_metric`` with the plateau scheduler) must be produced."""
    valid = get_task(cfg.task).metric_names(cfg)
    keys = ["best_metric"] + (["plateau_metric"] if cfg.train.scheduler == "plateau" else [])
    for key in keys:
        name = getattr(cfg.train, key)
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"train.{key} = {name!r} is not a metric the {cfg.task} task's evaluation gives with these eval "
                f"settings; {hint}valid names: {', '.join(valid)}")


def check_device(name: str) -> None:
    """``train.device`` must exist on this machine."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device = {name!r} but CUDA is not available here (torch {torch.__version__}); "
                              "use auto or cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device = {name!r} but this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device = 'mps' but MPS is not available here; use auto or cpu")


def check_wandb(train: TrainConfig) -> None:
    """``train.wandb`` needs the optional ``wandb`` package; it is looked up, not imported (that takes seconds)."""
    if not train.wandb:
        return
    try:
        found = importlib.util.find_spec("wandb") is not None
    except ValueError:  # a module in sys.modules without a spec: it imports
        found = True
    if not found:
        raise ConfigError(f"train.wandb is true but the wandb package is not installed: {WANDB_INSTALL_HINT}, "
                          "or set train.wandb=false")


def check_backbone_checkpoint(model: ModelConfig) -> None:
    """``model.backbone_checkpoint`` must be a file that loads with ``weights_only=True``."""
    path = model.backbone_checkpoint
    if not path:
        return
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.backbone_checkpoint: file not found: {path}")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and permission errors all mean the same to the user
        raise ValueError(f"model.backbone_checkpoint: {path} is not a readable weights file "
                         f"({type(err).__name__}: {err})") from None


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` and a temp file in it, then remove what the check created."""
    created = []
    folder = run_dir
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise ConfigError(f"train.output_dir {str(run_dir)!r} is not writable: {err.strerror or err}") from None
    finally:
        for path in created:  # so that a run refused later leaves no empty folders behind
            try:
                path.rmdir()
            except OSError:
                break


def check_no_previous_run(run_dir: Path, overwrite: bool) -> None:
    """Refuse a folder holding a previous run unless ``overwrite``."""
    found = [name for name in RUN_MARKERS if (run_dir / name).exists()]
    if found and not overwrite:
        raise FileExistsError(f"{run_dir} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                              "--overwrite to replace it, or choose another train.output_dir")


def load_resume_checkpoint(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Load ``run_dir/last.pth`` and check that its stored model config equals ``cfg.model``."""
    path = run_dir / "last.pth"
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} not found (check train.output_dir, or start without --resume)")
    state = load_checkpoint(path)
    stored = {**to_dict(ModelConfig()), **(state["config"].get("model") or {})}
    current = to_dict(cfg.model)
    differ = [key for key in current if stored.get(key) != current[key]]
    if differ:
        changes = ", ".join(f"model.{k} ({stored.get(k)!r} there, {current[k]!r} now)" for k in differ)
        raise ConfigError(f"cannot resume from {path}: its model config differs: {changes}")
    return state


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """After every check passed: remove stale temp files and, with ``overwrite``, the previous run's files."""
    count, size = remove_stale_temp_files(run_dir)
    if count:
        log.info("removed %d temp file(s) (%.1f MB) left in %s by an interrupted write", count, size / 2**20, run_dir)
    if overwrite:
        removed = []
        for name in RUN_FILES:
            if remove_path(run_dir / name):
                removed.append(name)
        if removed:
            log.info("--overwrite: removed the previous run's %s from %s", ", ".join(removed), run_dir)
