"""Trainer: a tiny end-to-end run, exact resume after a kill, skipped non-finite batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rsiseg.checkpoint import load_checkpoint
from rsiseg.config import config_from_dict
from rsiseg.engine.sampler import epoch_batches
from rsiseg.engine.trainer import Trainer
from tests.conftest import tiny_config_dict


class Killed(Exception):
    """Stands in for a SIGKILL in the middle of training."""


def make_config(synth_data: dict[str, Path], out: Path, **train):
    raw = tiny_config_dict(synth_data, out)
    raw["train"].update(train)
    raw["data"].update({"hflip": 0.5, "vflip": 0.5, "rot90": 0.5, "color_jitter": 0.1})
    return config_from_dict(raw)


def test_epoch_batches_are_a_function_of_seed_and_epoch() -> None:
    assert epoch_batches(7, 2, 0, 3) == epoch_batches(7, 2, 0, 3)
    assert epoch_batches(7, 2, 0, 3) != epoch_batches(7, 2, 0, 4)
    assert sorted(i for b in epoch_batches(7, 2, 0, 1) for i in b) == list(range(7))


def test_tiny_run_writes_everything(synth_data: dict[str, Path], tmp_path: Path) -> None:
    cfg = make_config(synth_data, tmp_path / "run", epochs=2, tensorboard=True)
    metrics = Trainer(cfg, progress=False).fit()
    run = tmp_path / "run"
    for name in ("config.yaml", "last.pth", "best.pth", "metrics.jsonl", "curves.png", "metrics.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert set(metrics) == {"bbox", "segm"} and 0.0 <= metrics["bbox"]["AP50"] <= 1.0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == list(range(1, 7))  # 6 images / batch 2 x 2 epochs
    assert all(r["loss"] > 0 for r in train)
    assert sum(r["kind"] == "eval" for r in records) == 2
    state = torch.load(run / "last.pth", map_location="cpu", weights_only=True)  # must not need pickle
    assert state["iteration"] == 6 and state["epoch"] == 2
    assert state["config"]["model"]["name"] == "maskrcnn_r18_fpn"
    for key in ("model", "optimizer", "scheduler", "scaler", "rng_state", "metrics"):
        assert key in state


def test_resume_after_kill_matches_uninterrupted_run(synth_data: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    settings = dict(epochs=2, checkpoint_interval=1, eval_interval=0, scheduler="cosine", warmup_iters=2)
    Trainer(make_config(synth_data, tmp_path / "full", **settings), progress=False).fit()
    full = load_checkpoint(tmp_path / "full" / "last.pth")

    original_step = Trainer.train_step

    def step_then_die(self, images, targets):
        if self.iteration == 4:  # iterations 0-3 done and checkpointed; die inside the second epoch
            raise Killed
        return original_step(self, images, targets)

    monkeypatch.setattr(Trainer, "train_step", step_then_die)
    with pytest.raises(Killed):
        Trainer(make_config(synth_data, tmp_path / "killed", **settings), progress=False).fit()
    assert load_checkpoint(tmp_path / "killed" / "last.pth")["iteration"] == 4
    monkeypatch.setattr(Trainer, "train_step", original_step)
    Trainer(make_config(synth_data, tmp_path / "killed", **settings), resume=True, progress=False).fit()
    resumed = load_checkpoint(tmp_path / "killed" / "last.pth")

    assert resumed["iteration"] == full["iteration"] == 6
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert resumed["scheduler"] == full["scheduler"]
    assert torch.equal(resumed["rng_state"]["torch"], full["rng_state"]["torch"])
    first = full["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(first, resumed["optimizer"]["state"][0]["momentum_buffer"])
    logged = [json.loads(x)["iteration"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "train"]
    assert logged == list(range(1, 7))  # no duplicated records after the resume


def test_a_run_continued_after_the_time_budget_matches_the_uninterrupted_run(synth_data: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    # plateau counts evaluations: the budget's extra one (at iteration 1) must not step it
    settings = dict(epochs=2, eval_interval=1, scheduler="plateau", plateau_patience=0, warmup_iters=0)
    Trainer(make_config(synth_data, tmp_path / "full", **settings), progress=False).fit()
    full = load_checkpoint(tmp_path / "full" / "last.pth")
    Trainer(make_config(synth_data, tmp_path / "cut", time_budget=0.0001, **settings), progress=False).fit()
    assert load_checkpoint(tmp_path / "cut" / "last.pth")["iteration"] == 1
    Trainer(make_config(synth_data, tmp_path / "cut", **settings), resume=True, progress=False).fit()
    continued = load_checkpoint(tmp_path / "cut" / "last.pth")

    assert (continued["iteration"], continued["total_iterations"]) == (full["iteration"], full["total_iterations"])
    assert continued["scheduler"] == full["scheduler"]
    for key, value in full["model"].items():
        assert torch.equal(value, continued["model"][key]), key


def test_non_finite_loss_is_skipped_and_counted(synth_data: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_config(synth_data, tmp_path / "run", epochs=1, eval_interval=0)
    trainer = Trainer(cfg, progress=False)
    forward = trainer.model.forward
    calls = {"n": 0}

    def sometimes_nan(images, targets=None):
        out = forward(images, targets)
        calls["n"] += 1
        if calls["n"] == 2:
            out["loss_mask"] = out["loss_mask"] * float("nan")
        return out

    monkeypatch.setattr(trainer.model, "forward", sometimes_nan)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert trainer.skipped_batches == 1
    assert load_checkpoint(tmp_path / "run" / "last.pth")["metrics"]["skipped_batches"] == 1
    after = trainer.model.state_dict()
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_num_classes_mismatch_is_explained(synth_data: dict[str, Path], tmp_path: Path) -> None:
    raw = tiny_config_dict(synth_data, tmp_path / "run", num_classes=2)
    with pytest.raises(ValueError, match="model.num_classes is 2 but .* has 5 categories"):
        Trainer(config_from_dict(raw), progress=False)
