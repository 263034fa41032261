"""Run logs: the progress line, smoothing, a metrics.jsonl cut short by a kill, the curves PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsiseg.engine.logging import format_progress, plot_curves, read_records, smooth


def test_progress_line_holds_losses_lr_pace_and_eta() -> None:
    line = format_progress(20, 400, {"loss": 1.23456, "loss_mask": 0.5}, 1e-3, 0.85, 323.4)
    assert line == "iter 20/400  loss 1.2346 (loss_mask 0.500)  lr 1.00e-03  0.85 s/it  ETA 0:05:23"


def test_smooth_is_an_exponential_moving_average() -> None:
    assert smooth([1.0, 3.0], weight=0.5) == [1.0, 2.0]
    assert smooth([4.0, 2.0, 7.0]) == [4.0, 2.0, 7.0]  # too few points to smooth by default
    noisy = [1.0 + (-1) ** i for i in range(400)]
    assert max(smooth(noisy)[100:]) - min(smooth(noisy)[100:]) < 0.2


def test_truncated_last_record_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    good = {"kind": "train", "iteration": 1, "epoch": 0, "loss": 1.0}
    path.write_text(json.dumps(good) + "\n" + '{"kind": "train", "itera')
    assert read_records(path) == [good]
    path.write_text('{"kind": \n' + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        read_records(path)


def test_curves_png_with_smoothed_losses(tmp_path: Path) -> None:
    lines = [{"kind": "train", "iteration": i, "epoch": 0, "loss": 2.0 / i, "loss_mask": 1.0 / i} for i in range(1, 60)]
    lines.append({"kind": "eval", "iteration": 59, "epoch": 1, "segm/AP": 0.3})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]  # no temp file left


# --------------------------------------------------------------------------- Weights & Biases (optional)


class FakeWandbRun:
    """Records what a W&B run is given."""

    def __init__(self, calls: dict[str, list]) -> None:
        self.calls = calls

    def log(self, data: dict[str, float], step: int | None = None) -> None:
        self.calls["log"].append((dict(data), step))

    def finish(self) -> None:
        self.calls["finish"].append(True)


class FakeSummaryWriter:
    """Records TensorBoard scalars as ``(tag, value, step)``."""

    def __init__(self, scalars: list[tuple[str, float, int]]) -> None:
        self.scalars = scalars

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        pass


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """A stand-in ``wandb`` module in ``sys.modules``; returns its recorded init/log/finish calls."""
    import sys
    import types

    calls: dict[str, list] = {"init": [], "log": [], "finish": []}
    module = types.ModuleType("wandb")

    def init(**kwargs):
        calls["init"].append(kwargs)
        return FakeWandbRun(calls)

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


@pytest.fixture
def tensorboard_scalars(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float, int]]:
    from rsiseg.engine import logging as run_logging

    scalars: list[tuple[str, float, int]] = []
    monkeypatch.setattr(run_logging, "_tensorboard_writer", lambda path: FakeSummaryWriter(scalars))
    return scalars


def wandb_scalars(calls: dict[str, list]) -> list[tuple[str, float, int]]:
    return [(tag, value, step) for data, step in calls["log"] for tag, value in data.items()]


def test_wandb_gets_the_tensorboard_scalars_and_keeps_its_run_id_on_resume(
        tmp_path: Path, fake_wandb: dict[str, list], tensorboard_scalars: list) -> None:
    from rsiseg.engine.logging import WANDB_ID_FILE, RunLogger

    run = tmp_path / "my_run"
    logger = RunLogger(run, tensorboard=True, wandb_project="proj", config={"name": "tiny", "train": {"lr": 0.1}})
    logger.write("train", 1, 0, {"loss": 2.5, "lr": 0.1})
    logger.write("eval", 1, 0, {"segm/AP": 0.25, "segm/APl": None})  # None: undefined, in neither
    logger.write("train", 2, 0, {"loss": 1.5, "lr": 0.05})
    logger.close()
    logger.close()  # a second close (Ctrl-C paths) does nothing
    assert wandb_scalars(fake_wandb) == tensorboard_scalars == [
        ("train/loss", 2.5, 1), ("train/lr", 0.1, 1), ("eval/segm/AP", 0.25, 1), ("train/loss", 1.5, 2),
        ("train/lr", 0.05, 2)]
    assert fake_wandb["finish"] == [True]
    (init,) = fake_wandb["init"]
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    assert init == {"project": "proj", "name": "my_run", "dir": str(run), "config": {"name": "tiny", "train": {"lr": 0.1}},
                    "id": run_id, "resume": "allow"}
    assert "mode" not in init  # WANDB_MODE=offline and WANDB_DISABLED are left to wandb

    RunLogger(run, tensorboard=False, resume_iteration=1, wandb_project="proj").close()
    assert fake_wandb["init"][1]["id"] == run_id  # a resumed run continues the same W&B run
    RunLogger(run, tensorboard=False, wandb_project="proj").close()
    assert fake_wandb["init"][2]["id"] != run_id  # a fresh run in the folder starts a new one
    assert (run / WANDB_ID_FILE).read_text().strip() == fake_wandb["init"][2]["id"]


def test_without_wandb_nothing_imports_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from rsiseg.engine.logging import RunLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
    logger = RunLogger(tmp_path / "run", tensorboard=False)
    logger.write("train", 1, 0, {"loss": 1.0})
    logger.close()
    with pytest.raises(ImportError, match="uv sync --extra wandb"):
        RunLogger(tmp_path / "other", tensorboard=False, wandb_project="proj")


def test_training_logs_the_same_scalars_to_wandb_and_tensorboard(
        synth_data: dict[str, Path], tmp_path: Path, fake_wandb: dict[str, list], tensorboard_scalars: list) -> None:
    from rsiseg.config import config_from_dict, to_dict
    from rsiseg.engine.trainer import Trainer
    from tests.conftest import tiny_config_dict

    raw = tiny_config_dict(synth_data, tmp_path / "run")
    raw["train"].update({"max_iters": 2, "tensorboard": True, "wandb": True, "wandb_project": "rsiseg-test"})
    cfg = config_from_dict(raw)
    Trainer(cfg, progress=False).fit()
    records = read_records(tmp_path / "run" / "metrics.jsonl")
    assert records[0]["kind"] == "run" and records[0]["world_size"] == 1  # the run's facts: not mirrored
    expected = [(f"{r['kind']}/{k}", v, r["iteration"]) for r in records[1:] for k, v in r.items()
                if k not in ("kind", "iteration", "epoch") and isinstance(v, (int, float))]
    assert {tag.split("/")[0] for tag, _, _ in expected} == {"train", "eval"}
    assert wandb_scalars(fake_wandb) == tensorboard_scalars == expected
    (init,) = fake_wandb["init"]
    assert init["project"] == "rsiseg-test" and init["config"] == to_dict(cfg) and init["resume"] == "allow"
    assert fake_wandb["finish"] == [True]


def test_wandb_missing_fails_before_training(synth_data: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from rsiseg.config import ConfigError, config_from_dict
    from rsiseg.engine.trainer import Trainer
    from tests.conftest import tiny_config_dict

    monkeypatch.setitem(sys.modules, "wandb", None)
    raw = tiny_config_dict(synth_data, tmp_path / "run")
    raw["train"]["wandb"] = True
    with pytest.raises(ConfigError, match=r"train.wandb is true but the wandb package is not installed: .*"
                                          r"uv sync --extra wandb.*pip install 'rsiseg\[wandb\]'"):
        Trainer(config_from_dict(raw), progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written
