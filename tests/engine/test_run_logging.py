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
