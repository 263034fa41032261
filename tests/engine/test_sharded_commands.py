"""``torchrun -m rsiseg predict / eval`` on 2 gloo processes write what one process writes.

Each command runs once on 1 rank and once on 2 spawned ranks (see ``ddp_launch``), into two
``--out`` folders that are then compared file by file: the instance ``eval`` and ``predict``, their
whole-scene ``--tiled`` forms, and the semantic ``predict``. The models are untrained (or trained one
step): what is checked is the sharding and the gathering in the single process's order, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tests.engine.ddp_launch import run_cli


def single_and_sharded(argv: list[str], tmp_path: Path, name: str) -> tuple[Path, Path]:
    """``rsiseg ARGV --out ...`` on 1 rank and on 2 ranks; the two ``--out`` folders."""
    single, sharded = tmp_path / f"{name}_1", tmp_path / f"{name}_2"
    assert run_cli(1, [*argv, "--out", str(single)], tmp_path / f"{name}_r1") == [0]
    assert run_cli(2, [*argv, "--out", str(sharded)], tmp_path / f"{name}_r2") == [0, 0]
    return single, sharded


def read_json(path: Path) -> object:
    return json.loads(path.read_text())


def assert_same_results(one: list[dict], two: list[dict]) -> None:
    """The same COCO results in the same order: ids and classes equal, scores to 1e-5, boxes to 1e-3 px and
    masks at IoU 0.99 (the ranks batch other images together: a pixel at the threshold may flip)."""
    assert len(one) == len(two) > 0
    assert [(r["image_id"], r["category_id"]) for r in one] == [(r["image_id"], r["category_id"]) for r in two]
    assert all(a["score"] == pytest.approx(b["score"], abs=1e-5) for a, b in zip(one, two))
    assert all(a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) for a, b in zip(one, two))
    ious = [mask_utils.iou([a["segmentation"]], [b["segmentation"]], [0])[0][0] for a, b in zip(one, two)
            if a["segmentation"] != b["segmentation"]]
    assert min(ious, default=1.0) >= 0.99


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_sharded_eval_and_predict_commands_write_the_single_process_results(
        synth_data: dict[str, Path], untrained_checkpoint: str, tmp_path: Path) -> None:
    common = ["--checkpoint", untrained_checkpoint, "--device", "cpu"]
    evaluate = ["-q", "eval", *common, "--data", str(synth_data["train"]), "--images", str(synth_data["images"])]
    one, two = single_and_sharded(evaluate, tmp_path, "eval")
    assert_same_results(read_json(one / "results.json"), read_json(two / "results.json"))
    assert read_json(one / "metrics.json") == read_json(two / "metrics.json")

    predict = ["-q", "predict", *common, str(synth_data["images"]), "--score-threshold", "0.05"]
    one, two = single_and_sharded(predict, tmp_path, "predict")
    assert_same_results(read_json(one / "predictions.json"), read_json(two / "predictions.json"))
    assert listing(two / "overlays") == listing(one / "overlays") and len(listing(one / "overlays")) == 8
    assert [e["id"] for e in read_json(two / "images.json")["images"]] == [
        e["id"] for e in read_json(one / "images.json")["images"]]


def test_sharded_tiled_predict_and_eval_write_the_single_process_results(
        synth_data: dict[str, Path], untrained_checkpoint: str, tmp_path: Path) -> None:
    tiles = ["--checkpoint", untrained_checkpoint, "--device", "cpu", "--tiled", "--tile-size", "64",
             "--tile-overlap", "16"]  # 128 px scenes: 9 tiles each
    predict = ["-q", "predict", *tiles, str(synth_data["images"]), "--score-threshold", "0.05",
               "--overview-size", "64"]
    one, two = single_and_sharded(predict, tmp_path, "tiled_predict")
    assert_same_results(read_json(one / "predictions.json"), read_json(two / "predictions.json"))
    scenes = read_json(one / "images.json")["images"]
    assert len(scenes) == 8 and {s["tiles"] for s in scenes} == {9}
    assert read_json(two / "images.json") == read_json(one / "images.json")  # in order, with every count
    assert read_json(two / "summary.json") == read_json(one / "summary.json")
    for folder in ("vectors", "overviews"):
        assert listing(two / folder) == listing(one / folder) and len(listing(one / folder)) == 8
    for name in listing(one / "vectors"):
        assert read_json(two / "vectors" / name) == read_json(one / "vectors" / name)

    evaluate = ["-q", "eval", *tiles, "--data", str(synth_data["train"]), "--images", str(synth_data["images"])]
    one, two = single_and_sharded(evaluate, tmp_path, "tiled_eval")
    results = read_json(one / "results.json")
    assert_same_results(results, read_json(two / "results.json"))
    assert {r["image_id"] for r in results} <= {im["id"] for im in read_json(synth_data["train"])["images"]}
    assert read_json(one / "metrics.json") == read_json(two / "metrics.json")


def test_sharded_semantic_predict_writes_the_single_process_masks(tmp_path: Path) -> None:
    from rsiseg.config import config_from_dict
    from rsiseg.data.synthetic_semantic import write_synthetic_semantic_dataset
    from rsiseg.engine.trainer import Trainer

    data = tmp_path / "data"
    write_synthetic_semantic_dataset(data, images=5, size=64, seed=2, val_fraction=0.2)  # 4 train images
    run = tmp_path / "run"
    Trainer(config_from_dict({
        "task": "semantic",
        "data": {"train_images": str(data / "images/train"), "train_labels": str(data / "labels/train"),
                 "num_workers": 0, "points": {"count": 100, "fraction": None}},
        "model": {"name": "seg_resnet18", "num_classes": 6, "seg": {"decoder_channels": [16, 16, 8, 8, 8]}},
        "train": {"output_dir": str(run), "epochs": 1, "max_iters": 1, "batch_size": 2, "warmup_iters": 0,
                  "tensorboard": False, "seed": 0, "best_metric": "semantic/mIoU"},
    }), progress=False).fit()
    predict = ["-q", "predict", str(data / "images/train"), "--checkpoint", str(run / "last.pth"), "--device", "cpu"]
    one, two = single_and_sharded(predict, tmp_path, "semantic")
    entries = read_json(one / "images.json")["images"]
    assert len(entries) == 4 and read_json(two / "images.json") == read_json(one / "images.json")
    for entry in entries:
        for key in ("mask", "colour"):
            assert np.array_equal(np.asarray(Image.open(two / entry[key])), np.asarray(Image.open(one / entry[key])))
