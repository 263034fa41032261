"""The prompted task end to end: PointSAM trains, resumes exactly and is evaluated as a user would run it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from rsiseg.cli import main
from rsiseg.config import config_from_dict
from rsiseg.engine.trainer import Trainer
from rsiseg.tasks import get_task


def prompted_config(data: dict[str, Path], out: Path, **train) -> dict:
    options = {"output_dir": str(out), "max_iters": 2, "batch_size": 2, "optimizer": "sgd", "lr": 0.01,
               "warmup_iters": 0, "scheduler": "constant", "eval_interval": 0, "best_metric": "prompt/mIoU", "seed": 0, "tensorboard": False,
               "device": "cpu"}
    options.update(train)
    return {"name": "prompted", "task": "prompted",
            "data": {"train_ann": str(data["train"]), "train_images": str(data["images"]),
                     "val_ann": str(data["val"]), "val_images": str(data["images"]), "num_workers": 0},
            "model": {"name": "pointsam_tiny", "num_classes": 5,
                      "sam": {"mode": "pointsam", "confidence": 0.0, "prompts_per_image": 4,
                              "prototype_interval": 1, "prototype_bank": 16, "num_prototypes": 2}},
            "train": options, "eval": {"batch_size": 2}}


def test_training_writes_the_prompted_metrics(synth_data: dict[str, Path], tmp_path: Path) -> None:
    trainer = Trainer(config_from_dict(prompted_config(synth_data, tmp_path / "run")), progress=False)
    metrics = trainer.fit()
    prompt = metrics["prompt"]
    gt = json.loads(Path(synth_data["val"]).read_text())
    assert prompt["instances"] == sum(not a.get("iscrowd") for a in gt["annotations"]) and prompt["missing"] == 0
    assert 0.0 <= prompt["mIoU"] <= 1.0 and set(metrics) == {"prompt", "segm", "bbox"}
    names = get_task("prompted").metric_names(trainer.cfg)
    assert "prompt/mIoU" in names and "segm/AP" in names and "bbox/AP50" in names
    assert (tmp_path / "run" / "last.pth").is_file()


def test_pointsam_resume_is_exact(synth_data: dict[str, Path], tmp_path: Path) -> None:
    """The teacher, the prototype bank and the strong views' random draws all continue where they stopped."""
    whole = Trainer(config_from_dict(prompted_config(synth_data, tmp_path / "whole", max_iters=4)), progress=False)
    whole.fit()
    first = Trainer(config_from_dict(prompted_config(synth_data, tmp_path / "split", max_iters=2)), progress=False)
    first.fit()
    resumed = Trainer(config_from_dict(prompted_config(synth_data, tmp_path / "split", max_iters=4)), resume=True,
                      progress=False)
    resumed.fit()
    state = resumed.model.state_dict()
    assert int(state["bank.count"]) > 0 and int(state["steps"]) == 4
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_eval_of_a_checkpoint_and_zero_shot_from_a_config(synth_data: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    raw = prompted_config(synth_data, tmp_path / "run", max_iters=1)
    Trainer(config_from_dict(raw), progress=False).fit()
    out = tmp_path / "eval"
    assert main(["-q", "eval", "--checkpoint", str(tmp_path / "run" / "last.pth"), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    gt = json.loads(Path(synth_data["val"]).read_text())
    assert sorted(r["annotation_id"] for r in results) == sorted(a["id"] for a in gt["annotations"])
    assert "prompt" in json.loads((out / "metrics.json").read_text())
    config = tmp_path / "zero_shot.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["-q", "eval", "--config", str(config), "--out", str(tmp_path / "zero")]) == 0
    assert "| prompt |" in (tmp_path / "zero" / "metrics.md").read_text()
    assert main(["-q", "eval", "--config", str(config), "--checkpoint", "x.pth"]) == 2
    assert "pass one of" in capsys.readouterr().err
    assert main(["-q", "info", str(config), "--no-speed", "--input-size", "64", "64"]) == 0  # one centre point
    assert "pointsam_tiny" in capsys.readouterr().out


def test_data_points_writes_one_point_per_instance(synth_data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "points.json"
    assert main(["-q", "data", "points", "--ann", str(synth_data["val"]), "--out", str(out)]) == 0
    points = json.loads(out.read_text())["points"]
    gt = json.loads(Path(synth_data["val"]).read_text())
    assert sorted(p["annotation_id"] for p in points) == sorted(a["id"] for a in gt["annotations"])
    assert main(["-q", "data", "points", "--ann", str(synth_data["val"]), "--out", str(out)]) == 2  # no overwrite
