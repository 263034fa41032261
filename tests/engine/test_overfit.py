"""Every model in the registry overfits two tiny images; ``rsiseg overfit`` writes its report and exit code.

The models are read from ``MODELS`` when the tests are collected, so a newly registered model is
tested here without touching this file. Instance models train on the tiny config of
``tests/conftest.py`` (128 px, FPN of 64 channels) with ``model.name`` swapped, plus a family's own
tiny options (``FAMILY_OPTIONS``); semantic models on a tiny semantic config (64 px, every pixel
labelled). Measured on the 2-core CPU, quiet (iterations until the target, evaluating every 5,
and seconds of the test):

===========================  ==================  ==========  =======  =======
model                        target              iterations  seconds  run
===========================  ==================  ==========  =======  =======
maskrcnn_r18_fpn             segm/AP50 >= 0.9    55          25       default
maskrcnn_effb0_cbam          segm/AP50 >= 0.9    75          36       default
seg_resnet18                 mIoU >= 0.9         80          17       default
cascade_maskrcnn_r18_fpn     segm/AP50 >= 0.9    50          29       default
maskrcnn_r18_prompt          segm/AP50 >= 0.9    60          26       default
cascade_maskrcnn_r18_prompt  segm/AP50 >= 0.9    40          22       default
pointsam_tiny                prompt/mIoU >= 0.7  140         70       default
maskrcnn_r34_fpn             segm/AP50 >= 0.9    40          22       slow
maskrcnn_r50_fpn             segm/AP50 >= 0.9    55          34       slow
maskrcnn_r101_fpn            segm/AP50 >= 0.9    65          57       slow
cascade_maskrcnn_r50_fpn     segm/AP50 >= 0.9    60          39       slow
maskrcnn_r50_prompt          segm/AP50 >= 0.9    60          34       slow
cascade_maskrcnn_r50_prompt  segm/AP50 >= 0.9    55          38       slow
===========================  ==================  ==========  =======  =======

The deeper ResNets share every line of code with maskrcnn_r18_fpn, so they are the ones left to
``-m slow``: the default run (about 230 s) keeps one model of each family. The prompt models run with
``model.prompt``'s defaults (every part on). The tiny SAM starts from random weights and trains every weight,
half its prompts boxes (its pretraining recipe); its points are answered by empty masks for the first 75
iterations. SAM ViT-B/L/H (1024 px) run only with CUDA.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

from rsiseg.commands import overfit
from rsiseg.models.registry import MODELS
from tests.conftest import tiny_config_dict

# Deselected by default (run them with `-m slow`): the deeper variants of a family already tested by default.
SLOW = {"maskrcnn_r34_fpn", "maskrcnn_r50_fpn", "maskrcnn_r101_fpn", "cascade_maskrcnn_r50_fpn", "maskrcnn_r50_prompt",
        "cascade_maskrcnn_r50_prompt", "yolact_r50"}
# What an honest overfit of two images reaches, per task: (metric, target, iterations at most: about twice
# the most any model needed).
GOALS = {"instance": ("segm/AP50", 0.9, 150), "semantic": ("semantic/mIoU", 0.9, 150),
         "prompted": ("prompt/mIoU", 0.7, 400)}
# SAM at its released 1024 px size is not for a CPU: its overfit runs only where CUDA is (`-m gpu`).
GPU_ONLY = {"pointsam_vit_b", "pointsam_vit_l", "pointsam_vit_h"}
# A family designed around other settings than the ResNet ones of the conftest gets its own tiny options (those
# of its configs/*_tiny.yaml). Without them maskrcnn_effb0_cbam stalled at segm/AP50 0.84 in 300 iterations.
FAMILY_OPTIONS = {
    "maskrcnn_effb0_cbam": {
        "model": {"anchor_sizes": [[8, 16], [16, 32], [32, 64], [64, 128], [128, 256]], "rpn_fg_iou": 0.5,
                  "attention": {"box_head_dim": 256}},
        "train": {"grad_clip": 1.0, "weight_decay": 0.001},
    },
}


@pytest.fixture(scope="session")
def tiny_semantic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rsiseg.data.synthetic_semantic import write_synthetic_semantic_dataset

    out = tmp_path_factory.mktemp("overfit_semantic")
    write_synthetic_semantic_dataset(out, images=4, size=64, seed=1, val_fraction=0.25)
    return out


def instance_config(data: dict[str, Path], model: str) -> dict:
    raw = tiny_config_dict(data, Path("unused"))
    raw["model"]["name"] = model
    raw["train"].update({"optimizer": "adamw", "lr": 1e-3})  # r18: 55 iterations; SGD at lr 0.005: 65
    for section, options in FAMILY_OPTIONS.get(model, {}).items():
        raw[section].update(options)
    return raw


def semantic_config(data: Path, model: str) -> dict:
    # Every pixel is a labelled point: the overfit is scored on dense labels, so it must see them all.
    return {
        "task": "semantic",
        "data": {"train_images": str(data / "images/train"), "train_labels": str(data / "labels/train"),
                 "num_workers": 0, "points": {"count": None, "fraction": 1.0}},
        "model": {"name": model, "num_classes": 6},  # default decoder: [32, 32, 16, 16, 8] stalled at mIoU 0.5
        "train": {"output_dir": "unused", "batch_size": 2, "optimizer": "adam", "lr": 1e-3, "warmup_iters": 0,
                  "best_metric": "semantic/mIoU", "tensorboard": False, "seed": 0},
        "eval": {"batch_size": 2},
    }


def prompted_config(data: dict[str, Path], model: str) -> dict:
    # Every weight trains (a random SAM has nothing to adapt), one answer per prompt, half the prompts boxes:
    # the pretraining recipe of configs/pointsam_tiny.yaml.
    raw = instance_config(data, model)
    raw["task"] = "prompted"
    raw["model"] = {"name": model, "num_classes": raw["model"]["num_classes"],
                    "sam": {"mode": "supervised", "trainable": "all", "multimask": False, "box_prompts": 0.5}}
    raw["train"].update({"best_metric": "prompt/mIoU", "grad_clip": 1.0})
    return raw


def tiny_config(request: pytest.FixtureRequest, model: str, tmp_path: Path) -> tuple[Path, str]:
    """A YAML file of the tiny config for ``model``, and its task."""
    tasks = MODELS[model].tasks
    if "instance" in tasks:
        raw, task = instance_config(request.getfixturevalue("synth_data"), model), "instance"
    elif "semantic" in tasks:
        raw, task = semantic_config(request.getfixturevalue("tiny_semantic_data"), model), "semantic"
    elif "prompted" in tasks:
        raw, task = prompted_config(request.getfixturevalue("synth_data"), model), "prompted"
    else:
        pytest.fail(f"{model} serves {tasks}: give tests/engine/test_overfit.py a tiny config for that task")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, task


def run_overfit(config: Path, out: Path, *options: str) -> int:
    parser = argparse.ArgumentParser()
    overfit.add_arguments(parser)
    args = parser.parse_args([str(config), "--out", str(out), *options])
    args.quiet = True
    return overfit.run(args)


def marks(name: str) -> list[pytest.MarkDecorator]:
    if name in GPU_ONLY:
        return [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    return [pytest.mark.slow] if name in SLOW else []


@pytest.mark.parametrize("model", [pytest.param(name, marks=marks(name), id=name) for name in MODELS])
def test_every_model_overfits_two_tiny_images(model: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    config, task = tiny_config(request, model, tmp_path)
    metric, target, iters = GOALS[task]
    out = tmp_path / "overfit"
    code = run_overfit(config, out, "--images", "2", "--iters", str(iters), "--eval-every", "5",
                       "--target", str(target))
    report = json.loads((out / "overfit.json").read_text())
    values = [(e["iteration"], e["metrics"][metric]) for e in report["evals"]]
    assert code == 0 and report["reached"], f"{model}: {metric} never reached {target}: {values}"
    assert report["metric"] == metric and report["evals"][-1]["metrics"][metric] >= target
    assert report["iterations"] == report["evals"][-1]["iteration"] <= iters
    assert sorted(p.stem for p in (out / "gt_vs_pred").iterdir()) == sorted(Path(n).stem for n in report["images"])
    if task == "instance":
        subset = json.loads((out / "subset.json").read_text())
        assert [image["file_name"] for image in subset["images"]] == report["images"]


def test_report_figures_and_exit_code_when_the_target_is_missed(tiny_semantic_data: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(semantic_config(tiny_semantic_data, "seg_resnet18")))
    options = ("--iters", "3", "--eval-every", "2", "--target", "0.99")
    assert run_overfit(config, tmp_path / "a", *options) == 1  # 3 iterations fit nothing
    assert "overfit: NOT reached: semantic/mIoU" in capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "overfit.json").read_text())
    assert not report["reached"] and report["iterations"] == 3 and report["target"] == 0.99
    assert report["images"] == ["scene_00000.png", "scene_00001.png"]  # the first two by name
    assert [e["iteration"] for e in report["evals"]] == [2, 3]  # every 2, and the last
    assert set(report["evals"][0]["losses"]) == {"loss", "loss_pce"}
    assert {"semantic/mIoU", "semantic/accuracy"} <= set(report["evals"][0]["metrics"])
    for name in report["images"]:
        figure = tmp_path / "a" / "gt_vs_pred" / f"{Path(name).stem}.png"
        from PIL import Image

        with Image.open(figure) as image:
            assert image.width > 2 * image.height  # input, ground truth and prediction side by side

    assert run_overfit(config, tmp_path / "b", *options) == 1
    again = json.loads((tmp_path / "b" / "overfit.json").read_text())
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in report["evals"]]
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in again["evals"]] == strip  # seeded: repeats


def test_a_metric_the_task_does_not_give_is_refused(tiny_semantic_data: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(semantic_config(tiny_semantic_data, "seg_resnet18")))
    with pytest.raises(ValueError, match="--metric 'segm/AP50' is not one of the semantic task's metrics"):
        run_overfit(config, tmp_path / "out", "--metric", "segm/AP50")
    assert not (tmp_path / "out" / "overfit.json").exists()


def test_a_diverged_run_stops_and_says_so(tiny_semantic_data: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    raw = semantic_config(tiny_semantic_data, "seg_resnet18")
    raw["train"]["lr"] = 1e30  # the first step sends the weights to inf, every later loss is NaN
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert run_overfit(config, tmp_path / "out", "--iters", "100", "--eval-every", "50") == 1
    assert "diverged" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "overfit.json").read_text())
    assert report["diverged"] and report["iterations"] < 20 and report["skipped_batches"] >= 10
