"""Point prompts for users: ``Predictor.segment(points=...)`` on a PointSAM checkpoint and ``rsiseg prompt --points``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsiseg.cli import main
from rsiseg.commands.prompt import parse_points
from rsiseg.config import config_from_dict
from rsiseg.engine.trainer import Trainer
from rsiseg.inference.predictor import Predictor
from tests.tasks.test_prompted_end_to_end import prompted_config


@pytest.fixture(scope="module")
def sam_checkpoint(synth_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    run = tmp_path_factory.mktemp("pointsam")
    raw = prompted_config(synth_data, run, max_iters=1)
    raw["model"]["sam"]["mode"] = "supervised"
    raw["data"]["val_ann"] = None
    Trainer(config_from_dict(raw), progress=False).fit()
    return str(run / "last.pth")


def test_segment_encodes_once_and_answers_points_and_boxes(sam_checkpoint: str) -> None:
    predictor = Predictor.from_checkpoint(sam_checkpoint, "cpu")
    assert predictor.takes_points
    calls = []
    predictor.loaded.model.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    image = (np.random.default_rng(0).random((100, 120, 3)) * 255).astype(np.uint8)
    one = predictor.segment(image, points=[[30, 40], [80, 60]])
    two = predictor.segment(points=[[[30, 40], [80, 60]]], point_labels=[[1, 0]])  # the cached image
    boxed = predictor.segment(boxes=[[10, 10, 50, 60]])
    both = predictor.segment(points=[[30, 40]], boxes=[[10, 10, 50, 60]])
    assert len(calls) == 1
    assert one["masks"].shape == (2, 1, 100, 120) and one["scores"].shape == (2,)
    assert two["masks"].shape == boxed["masks"].shape == both["masks"].shape == (1, 1, 100, 120)
    again = predictor.segment(image, points=[[30, 40]])  # the same answer from the cache
    assert torch.allclose(again["masks"][0], one["masks"][0], atol=1e-5)
    with pytest.raises(ValueError, match="prompt k pairs points k with box k"):
        predictor.segment(points=[[30, 40], [1, 1]], boxes=[[10, 10, 50, 60]])
    with pytest.raises(ValueError, match=r"\[K, 2\] or \[K, P, 2\]"):
        predictor.segment(points=[[1, 2, 3]])


def test_parse_points(tmp_path: Path) -> None:
    assert parse_points(["10,20", "5,5,0", "7.5,8,1"], "a.png") == ([[10, 20], [7.5, 8]], [[5, 5]])
    csv = tmp_path / "points.csv"
    csv.write_text("image,x,y,class\na.png,3,4,1\nb.png,9,9,1\n")
    assert parse_points([str(csv)], "a.png") == ([[3.0, 4.0]], [])
    with pytest.raises(ValueError, match="expected x,y or x,y,label"):
        parse_points(["1,2,3"], "a.png")
    with pytest.raises(ValueError, match="no object point"):
        parse_points(["1,2,0"], "a.png")


def test_prompt_command_with_points(sam_checkpoint: str, tmp_path: Path) -> None:
    image = tmp_path / "scene.png"
    Image.fromarray((np.random.default_rng(1).random((90, 140, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "out"
    argv = ["-q", "prompt", "--checkpoint", sam_checkpoint, str(image), "--points", "20,30", "100,50", "60,60,0",
            "--boxes", "5,5,40,30", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    prompts = json.loads((out / "prompts.json").read_text())["prompts"]
    assert [p["prompt"] for p in prompts] == [0, 1, 2]
    assert prompts[0]["points"] == [[20, 30, 1], [60, 60, 0]] and prompts[2]["box"] == [5, 5, 40, 30]
    assert all(p["segmentation"]["size"] == [90, 140] and 0 <= p["score"] <= 1 for p in prompts)
    assert Image.open(out / "prompts.png").size == (140, 90)
