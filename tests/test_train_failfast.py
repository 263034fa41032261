"""Training refuses bad runs in its first second, never overwrites silently, stops cleanly.

Fail-fast cases are checked before any data is loaded, so each costs milliseconds; the cases that
train use the tiny config with one or two iterations.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from rsiseg.checkpoint import load_checkpoint, save_checkpoint
from rsiseg.cli import main
from rsiseg.config import ConfigError, config_from_dict, to_dict
from rsiseg.engine.preflight import check_metric_names
from rsiseg.engine.trainer import Trainer
from rsiseg.fileio import stale_temp_files
from rsiseg.tasks.instance import InstanceTask
from tests.conftest import ctrl_c_at, tiny_config_dict


def tiny(synth_data: dict[str, Path], run: Path, **sections: dict):
    raw = tiny_config_dict(synth_data, run)
    raw["data"]["num_workers"] = 0
    for section, values in sections.items():
        raw[section].update(values)
    return config_from_dict(raw)


def assert_nothing_written(run: Path) -> None:
    for name in ("last.pth", "best.pth", "metrics.jsonl", "config.yaml"):
        assert not (run / name).exists(), name


def fake_previous_run(run: Path) -> None:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"kind": "train", "iteration": 1, "epoch": 0, "loss": 1.0}\n')


# (config sections to change, exception type, text the message must hold)
FAIL_FAST = [
    ({"train": {"best_metric": "segm/APP"}}, ConfigError, "train.best_metric = 'segm/APP'"),
    ({"train": {"best_metric": "bbox/AR@1000"}}, ConfigError, "bbox/AR@100"),  # the coco preset has maxDets 100
    ({"train": {"best_metric": "segm/AP"}, "eval": {"iou_types": ["bbox"]}}, ConfigError, "train.best_metric"),
    ({"train": {"scheduler": "plateau", "plateau_metric": "mAP"}}, ConfigError, "train.plateau_metric = 'mAP'"),
    ({"model": {"name": "maskrcnn_r19_fpn"}}, ConfigError, "model.name = 'maskrcnn_r19_fpn'"),
    ({"model": {"backbone_checkpoint": "/nonexistent/r18.pth"}}, FileNotFoundError, "/nonexistent/r18.pth"),
]


@pytest.mark.parametrize(("sections", "error", "text"), FAIL_FAST, ids=[c[2] for c in FAIL_FAST])
def test_bad_run_is_refused_before_anything(synth_data: dict[str, Path], tmp_path: Path, sections: dict,
                                            error: type, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(InstanceTask, "build_datasets", lambda self, cfg: pytest.fail("data was loaded before the check"))
    run = tmp_path / "out" / "run"
    with pytest.raises(error, match=re.escape(text)):
        Trainer(tiny(synth_data, run, **sections), progress=False)
    assert not (tmp_path / "out").exists()  # not even the folder


def test_metric_names_follow_the_preset(synth_data: dict[str, Path], tmp_path: Path) -> None:
    check_metric_names(tiny(synth_data, tmp_path, train={"best_metric": "bbox/AR@1000"}, eval={"preset": "isaid"}))
    check_metric_names(tiny(synth_data, tmp_path, train={"plateau_metric": "typo"}))  # not plateau: unused
    with pytest.raises(ConfigError, match="did you mean 'segm/AP50'"):
        check_metric_names(tiny(synth_data, tmp_path, train={"best_metric": "sgem/AP50"}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_refused(synth_data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.device = 'cuda' but CUDA is not available"):
        Trainer(tiny(synth_data, tmp_path / "run", train={"device": "cuda"}), progress=False)
    assert not (tmp_path / "run").exists()


def test_unreadable_backbone_checkpoint_is_named(synth_data: dict[str, Path], tmp_path: Path) -> None:
    weights = tmp_path / "garbage.pth"
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"model.backbone_checkpoint: {re.escape(str(weights))} is not a readable"):
        Trainer(tiny(synth_data, tmp_path / "run", model={"backbone_checkpoint": str(weights)}), progress=False)
    assert_nothing_written(tmp_path / "run")


def test_unwritable_output_folder_is_refused(synth_data: dict[str, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="train.output_dir .*a_file/run.* is not writable"):
        Trainer(tiny(synth_data, blocker / "run"), progress=False)


def test_resume_needs_a_checkpoint(synth_data: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=f"cannot resume: {re.escape(str(run / 'last.pth'))} not found"):
        Trainer(tiny(synth_data, run), resume=True, progress=False)
    assert not run.exists()


def test_resume_refuses_a_different_model(synth_data: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    stored = tiny(synth_data, run, model={"fpn_channels": 32, "min_size": 96})
    save_checkpoint({"model": {}, "config": to_dict(stored)}, run / "last.pth")
    with pytest.raises(ConfigError, match=r"model.fpn_channels \(32 there, 64 now\), model.min_size \(96 there"):
        Trainer(tiny(synth_data, run), resume=True, progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["last.pth"]


def test_previous_run_is_not_overwritten(synth_data: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    fake_previous_run(run)
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="already holds a run .*--resume .*--overwrite"):
        Trainer(tiny(synth_data, run), progress=False)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(synth_data, run)))
    assert main(["train", str(config), "-q"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (run / "metrics.jsonl").read_text() == before
    with pytest.raises(SystemExit):
        main(["train", str(config), "--resume", "--overwrite"])


def test_overwrite_clears_the_previous_run_and_stale_temp_files(synth_data: dict[str, Path], tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    fake_previous_run(run)
    (run / "last.pth").write_bytes(b"old")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events").write_text("old")
    (run / "notes.txt").write_text("mine")
    for _ in range(2):  # what a checkpoint write killed by SIGKILL leaves
        handle, _ = tempfile.mkstemp(prefix=".last.pth.", suffix=".tmp", dir=run)
        os.write(handle, b"x" * 100)
        os.close(handle)
    assert len(stale_temp_files(run)) == 2
    with caplog.at_level(logging.INFO, logger="rsiseg"):
        Trainer(tiny(synth_data, run), progress=False, overwrite=True)
    assert stale_temp_files(run) == []
    assert "removed 2 temp file(s)" in caplog.text
    assert not (run / "last.pth").exists() and not (run / "tensorboard").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["run"] and (run / "notes.txt").read_text() == "mine"  # a new log


def test_time_budget_ends_with_checkpoint_and_final_eval(synth_data: dict[str, Path], tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    cfg = tiny(synth_data, run, train={"epochs": 3, "eval_interval": 0, "time_budget": 0.0001})
    with caplog.at_level(logging.INFO, logger="rsiseg"):
        metrics = Trainer(cfg, progress=False).fit()
    state = load_checkpoint(run / "last.pth")
    assert (state["iteration"], state["total_iterations"]) == (1, 9)  # the cut says so
    assert set(metrics) == {"bbox", "segm"} and (run / "metrics.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["run", "train", "eval"]
    assert "time budget of 0.0001 min spent: stopped at iteration 1 of 9" in caplog.text
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("iter 1/9"))
    for part in ("loss ", "loss_mask ", "lr ", " s/it", "ETA "):
        assert part in line, line
    assert (run / "curves.png").is_file()


def test_ctrl_c_exits_130_naming_the_checkpoint(synth_data: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(synth_data, run)))
    ctrl_c_at(monkeypatch, 1)
    args = ["train", str(config), "train.max_iters=3", "train.checkpoint_interval=1", "data.num_workers=0", "-q"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert err.strip() == (f"rsiseg train: interrupted at iteration 1 of 3; last checkpoint: {run / 'last.pth'} "
                           "(iteration 1); continue with --resume")
    assert load_checkpoint(run / "last.pth")["iteration"] == 1
    assert stale_temp_files(run) == []

    monkeypatch.setattr(Trainer, "train_step", lambda self, images, targets: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main([*args, "--overwrite"]) == 130
    assert "no checkpoint was written yet (start again with --overwrite)" in capsys.readouterr().err
