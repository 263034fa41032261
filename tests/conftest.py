"""Shared fixtures: a tiny synthetic COCO dataset and a tiny Mask R-CNN config.

Tiny means ResNet-18, a 64-channel FPN, 64 sampled RoIs and 128 px images, so that one
training step takes about a second on a 2-core CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rsiseg.config import ExperimentConfig, config_from_dict
from rsiseg.data.synthetic import SynthSpec, write_synthetic_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """8 synthetic 128 px images (6 train, 2 val) written once per test session."""
    out = tmp_path_factory.mktemp("synth")
    return write_synthetic_dataset(out, SynthSpec(images=8, size=128, seed=3, val_fraction=0.25), progress=False)


def tiny_config_dict(data: dict[str, Path], out_dir: Path, num_classes: int | None = None) -> dict:
    """The tiny experiment as a plain dict (tests tweak it before building the config)."""
    if num_classes is None:
        num_classes = len(json.loads(Path(data["train"]).read_text())["categories"])
    return {
        "name": "tiny",
        "data": {"train_ann": str(data["train"]), "train_images": str(data["images"]),
                 "val_ann": str(data["val"]), "val_images": str(data["images"])},
        "model": {"name": "maskrcnn_r18_fpn", "num_classes": num_classes, "fpn_channels": 64, "min_size": 128,
                  "max_size": 128, "roi_batch_size_per_image": 64, "rpn_batch_size_per_image": 64,
                  "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 100,
                  "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100,
                  "anchor_sizes": [[8], [16], [32], [64], [128]], "detections_per_img": 50},
        "train": {"output_dir": str(out_dir), "epochs": 1, "batch_size": 2, "lr": 0.005, "warmup_iters": 2,
                  "log_interval": 1, "tensorboard": False, "seed": 0},
        "eval": {"batch_size": 2},
    }


def ctrl_c_at(monkeypatch: pytest.MonkeyPatch, iteration: int) -> None:
    """Make ``Trainer.train_step`` raise ``KeyboardInterrupt`` (as Ctrl-C would) when the trainer reaches
    ``iteration``; ``monkeypatch.undo()`` restores it."""
    from rsiseg.engine.trainer import Trainer

    step = Trainer.train_step

    def interrupted(self, images, targets):
        if self.iteration == iteration:
            raise KeyboardInterrupt
        return step(self, images, targets)

    monkeypatch.setattr(Trainer, "train_step", interrupted)


@pytest.fixture
def tiny_config(synth_data: dict[str, Path], tmp_path: Path) -> ExperimentConfig:
    return config_from_dict(tiny_config_dict(synth_data, tmp_path / "run"))


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def untrained_checkpoint(synth_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A checkpoint of the untrained tiny model on the synthetic classes: its scores are low, most below 0.3."""
    from rsiseg.checkpoint import save_checkpoint
    from rsiseg.config import to_dict
    from rsiseg.models.registry import build_model

    cfg = config_from_dict(tiny_config_dict(synth_data, tmp_path_factory.mktemp("run")))
    torch.manual_seed(0)
    categories = json.loads(Path(synth_data["val"]).read_text())["categories"]
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_checkpoint({"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg),
                     "classes": {"names": [c["name"] for c in categories],
                                 "category_ids": [c["id"] for c in categories]}}, path)
    return str(path)
