"""The semantic task through the same trainer, ``eval``, ``predict`` and ``sweep`` as the instance models.

One tiny synthetic semantic set (64 px, six classes) is written per session; runs are a few
iterations of ResNet-18 at 64 px, well under a second each on a 2-core CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsiseg.checkpoint import load_checkpoint
from rsiseg.cli import main
from rsiseg.config import ConfigError, config_from_dict
from rsiseg.data.converters.potsdam import POTSDAM_PALETTE
from rsiseg.data.synthetic_semantic import write_synthetic_semantic_dataset
from rsiseg.engine.trainer import Trainer


@pytest.fixture(scope="session")
def semantic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_semantic")
    write_synthetic_semantic_dataset(out, images=8, size=64, seed=1, val_fraction=0.25)
    return out


def semantic_config(data: Path, run: Path, **train: object) -> dict:
    return {
        "task": "semantic",
        "data": {"train_images": str(data / "images/train"), "train_labels": str(data / "labels/train"),
                 "val_images": str(data / "images/val"), "val_labels": str(data / "labels/val"),
                 "num_workers": 0, "points": {"count": 200, "fraction": None}},
        "model": {"name": "seg_resnet18", "num_classes": 6, "seg": {"decoder_channels": [32, 32, 16, 16, 8]}},
        "train": {"output_dir": str(run), "epochs": 2, "batch_size": 2, "optimizer": "adam", "lr": 1e-3,
                  "scheduler": "step", "step_epochs": [1], "warmup_iters": 0, "best_metric": "semantic/mIoU",
                  "log_interval": 1, "tensorboard": False, "seed": 0, **train},
        "eval": {"batch_size": 2},
    }


def test_trainer_imports_nothing_of_coco_or_instances() -> None:
    engine = Path(__file__).resolve().parents[2] / "src" / "rsiseg" / "engine"
    hits = [f"{p.name}:{n}" for p in engine.glob("*.py") for n, line in enumerate(p.read_text().splitlines(), 1)
            if "coco" in line.lower()]
    assert hits == []


def test_inference_imports_nothing_from_engine() -> None:
    inference = Path(__file__).resolve().parents[2] / "src" / "rsiseg" / "inference"
    assert [p.name for p in inference.glob("*.py") if "rsiseg.engine" in p.read_text()] == []


def test_task_must_match_the_model(semantic_data: Path, tmp_path: Path) -> None:
    raw = semantic_config(semantic_data, tmp_path / "run")
    raw["task"] = "instance"
    raw["train"]["best_metric"] = "segm/AP"
    with pytest.raises(ConfigError, match="set task: semantic"):
        Trainer(config_from_dict(raw), progress=False)
    with pytest.raises(ConfigError, match="task"):
        config_from_dict({**raw, "task": "panoptic"})


def test_semantic_metric_names_are_checked_first(semantic_data: Path, tmp_path: Path) -> None:
    raw = semantic_config(semantic_data, tmp_path / "run", best_metric="segm/AP")
    with pytest.raises(ConfigError, match="train.best_metric = 'segm/AP' is not a metric the semantic task"):
        Trainer(config_from_dict(raw), progress=False)
    assert not (tmp_path / "run").exists()


def test_train_eval_predict(semantic_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = config_from_dict(semantic_config(semantic_data, run))
    metrics = Trainer(cfg, progress=False).fit()
    stats = metrics["semantic"]
    assert 0.0 <= stats["accuracy"] <= 1.0 and 0.0 <= stats["mIoU"] <= 1.0
    assert set(stats["per_class_IoU"]) == set(json.loads((semantic_data / "classes.json").read_text())["names"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "eval"] == [3, 6]  # 3 iterations per epoch
    assert (run / "curves.png").is_file() and (run / "best.pth").is_file()
    state = load_checkpoint(run / "best.pth")
    assert state["classes"]["names"] == list(stats["per_class_IoU"])

    assert main(["-q", "eval", "--checkpoint", str(run / "best.pth"), "--out", str(tmp_path / "eval")]) == 0
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(written["semantic"]) >= {"accuracy", "mIoU", "mean_accuracy", "per_class_IoU"}
    assert "mIoU" in (tmp_path / "eval" / "metrics.md").read_text()

    images = semantic_data / "images" / "val"
    assert main(["-q", "predict", str(images), "--checkpoint", str(run / "best.pth"), "--out",
                 str(tmp_path / "pred")]) == 0
    entries = json.loads((tmp_path / "pred" / "images.json").read_text())["images"]
    assert len(entries) == len(list(images.iterdir()))
    for entry in entries:
        index = np.asarray(Image.open(tmp_path / "pred" / entry["mask"]))
        colour = np.asarray(Image.open(tmp_path / "pred" / entry["colour"]).convert("RGB"))
        assert index.shape == colour.shape[:2] == (64, 64) and index.max() < 6
        expected = np.asarray(POTSDAM_PALETTE, dtype=np.uint8)[index]
        assert np.array_equal(colour, expected)  # each pixel has its class's palette colour


def test_predict_refuses_instance_options(semantic_data: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    Trainer(config_from_dict(semantic_config(semantic_data, run, max_iters=1)), progress=False).fit()
    code = main(["-q", "predict", str(semantic_data / "images" / "val"), "--checkpoint", str(run / "last.pth"),
                 "--out", str(tmp_path / "pred"), "--max-detections", "5"])
    assert code == 2
    assert "--max-detections" in capsys.readouterr().err
    assert not (tmp_path / "pred").exists()


def test_semantic_resume_is_exact(semantic_data: Path, tmp_path: Path) -> None:
    whole = Trainer(config_from_dict(semantic_config(semantic_data, tmp_path / "whole", eval_interval=0)),
                    progress=False)
    whole.fit()
    first = Trainer(config_from_dict(semantic_config(semantic_data, tmp_path / "split", eval_interval=0,
                                                     max_iters=4)), progress=False)
    first.fit()
    resumed = Trainer(config_from_dict(semantic_config(semantic_data, tmp_path / "split", eval_interval=0)),
                      resume=True, progress=False)
    resumed.fit()
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_sweep_over_the_point_count(semantic_data: Path, tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    import yaml

    config.write_text(yaml.safe_dump(semantic_config(semantic_data, tmp_path / "unused", max_iters=2)))
    out = tmp_path / "sweep"
    args = ["-q", "sweep", str(config), "--key", "data.points.count", "--values", "20", "400", "--out", str(out)]
    assert main(args) == 0
    rows = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["value"] for r in rows] == ["20", "400"]
    assert all(0.0 <= r["semantic/accuracy"] <= 1.0 for r in rows)
    assert (out / "sweep.png").is_file() and "| data.points.count |" in (out / "sweep.md").read_text()
    mtime = (out / "data.points.count=20" / "last.pth").stat().st_mtime
    assert main(args) == 0  # finished runs are reused, not retrained
    assert (out / "data.points.count=20" / "last.pth").stat().st_mtime == mtime


def test_predict_keeps_the_georeferencing_of_a_geotiff(semantic_data: Path, tmp_path: Path) -> None:
    import tifffile

    run = tmp_path / "run"
    Trainer(config_from_dict(semantic_config(semantic_data, run, max_iters=1)), progress=False).fit()
    rgb = np.asarray(Image.open(next((semantic_data / "images" / "val").iterdir())).convert("RGB"))
    scale, tiepoint = (0.5, 0.5, 0.0), (0.0, 0.0, 0.0, 368000.0, 5808000.0, 0.0)
    geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)  # projected, UTM 33N
    scene = tmp_path / "in" / "scene.tif"
    scene.parent.mkdir()
    tifffile.imwrite(scene, rgb, photometric="rgb", extratags=[(33550, "d", 3, scale, True),
                                                               (33922, "d", 6, tiepoint, True),
                                                               (34735, "H", len(geokeys), geokeys, True)])
    assert main(["-q", "predict", str(scene), "--checkpoint", str(run / "last.pth"), "--out", str(tmp_path / "p")]) == 0
    with tifffile.TiffFile(tmp_path / "p" / "masks" / "scene.tif") as tif:
        tags = tif.pages[0].tags
        assert tuple(tags[33550].value) == scale and tuple(tags[33922].value) == tiepoint
        assert tuple(tags[34735].value) == geokeys
        assert tif.pages[0].shape == rgb.shape[:2] and tif.pages[0].dtype == np.uint8


def test_a_classes_json_palette_colours_the_predictions(semantic_data: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(semantic_data, data)
    classes = json.loads((data / "classes.json").read_text())
    palette = [[10 * i + 5, 200 - 10 * i, 40] for i in range(6)]
    (data / "classes.json").write_text(json.dumps({**classes, "names": [f"c{i}" for i in range(6)],
                                                   "palette": palette}))
    run = tmp_path / "run"
    Trainer(config_from_dict(semantic_config(data, run, max_iters=1)), progress=False).fit()
    assert load_checkpoint(run / "last.pth")["classes"]["palette"] == palette
    assert main(["-q", "predict", str(data / "images" / "val"), "--checkpoint", str(run / "last.pth"), "--out",
                 str(tmp_path / "pred")]) == 0
    entry = json.loads((tmp_path / "pred" / "images.json").read_text())["images"][0]
    index = np.asarray(Image.open(tmp_path / "pred" / entry["mask"]))
    colour = np.asarray(Image.open(tmp_path / "pred" / entry["colour"]).convert("RGB"))
    assert np.array_equal(colour, np.asarray(palette, dtype=np.uint8)[index])
