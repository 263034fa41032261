"""Two-stage training (``train.freeze_backbone_epochs``): frozen, unfrozen, and an exact resume across the boundary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from rsiseg.checkpoint import load_checkpoint
from rsiseg.config import config_from_dict
from rsiseg.engine.optim import BackboneFreeze
from rsiseg.engine.trainer import Trainer
from tests.conftest import tiny_config_dict
from tests.engine.test_trainer import Killed

SETTINGS = dict(epochs=3, freeze_backbone_epochs=1, checkpoint_interval=1, eval_interval=0, warmup_iters=1)


def make_config(synth_data: dict[str, Path], out: Path, **train):
    raw = tiny_config_dict(synth_data, out)
    raw["train"].update(SETTINGS, **train)
    return config_from_dict(raw)


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("backbone.body.")}


def test_backbone_stays_fixed_in_the_first_stage_and_trains_after(synth_data: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[int, dict[str, torch.Tensor]] = {}
    original_save = Trainer.save

    def save_and_record(self, name):
        seen[self.iteration] = {k: v.clone() for k, v in self.model.state_dict().items()}
        original_save(self, name)

    monkeypatch.setattr(Trainer, "save", save_and_record)
    trainer = Trainer(make_config(synth_data, tmp_path / "run"), progress=False)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    per_epoch = trainer.iters_per_epoch  # 6 images, batch 2: 3 iterations
    first_stage = backbone_state(seen[per_epoch])
    for key, value in backbone_state(initial).items():
        assert torch.equal(value, first_stage[key]), key  # weights and BN statistics alike
    heads = [k for k in initial if k.startswith("rpn.")]
    assert any(not torch.equal(initial[k], seen[per_epoch][k]) for k in heads)
    last = backbone_state(seen[3 * per_epoch])
    assert any(not torch.equal(first_stage[k], last[k]) for k in first_stage if k.endswith("conv1.weight"))


def test_resume_across_the_stage_boundary_matches_the_uninterrupted_run(
        synth_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Trainer(make_config(synth_data, tmp_path / "full"), progress=False).fit()
    full = load_checkpoint(tmp_path / "full" / "last.pth")
    original_step = Trainer.train_step

    def step_then_die(self, images, targets):
        if self.iteration == 2:  # still frozen; the run is killed before the unfreeze
            raise Killed
        return original_step(self, images, targets)

    monkeypatch.setattr(Trainer, "train_step", step_then_die)
    with pytest.raises(Killed):
        Trainer(make_config(synth_data, tmp_path / "killed"), progress=False).fit()
    monkeypatch.setattr(Trainer, "train_step", original_step)
    Trainer(make_config(synth_data, tmp_path / "killed"), resume=True, progress=False).fit()
    resumed = load_checkpoint(tmp_path / "killed" / "last.pth")
    assert resumed["iteration"] == full["iteration"] == 9
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_trainable_layers_stay_frozen_after_the_unfreeze() -> None:
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.body = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1))
    model.backbone.body[0].weight.requires_grad_(False)  # a stage that trainable_layers keeps frozen
    freeze = BackboneFreeze(model, epochs=2)
    freeze.set_epoch(0)
    assert not any(p.requires_grad for p in model.backbone.body.parameters())
    model.train()
    freeze.hold_norms()
    assert not model.backbone.body[1].training
    freeze.set_epoch(2)
    assert [p.requires_grad for p in model.backbone.body.parameters()] == [False, True, True, True, True, True]
    model.train()
    freeze.hold_norms()
    assert model.backbone.body[1].training
    with pytest.raises(ValueError, match="freeze_backbone_epochs = 1 needs a model with a backbone"):
        BackboneFreeze(nn.Linear(2, 2), epochs=1)
    assert BackboneFreeze(nn.Linear(2, 2), epochs=0).params == []
