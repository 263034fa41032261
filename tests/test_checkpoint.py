"""Checkpoints: atomic writes, weights-only loading, RNG round trips."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rsiseg.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from rsiseg.fileio import remove_stale_temp_files, stale_temp_files


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}}, path)

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left behind


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "config": {}, "x": Payload()}, path)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="needs 'model' and 'config'"):
        load_checkpoint(path)


def test_rng_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    path = tmp_path / "r.pth"
    save_checkpoint({"model": {}, "config": {}, "rng_state": rng_state()}, path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(path)["rng_state"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_temp_files_of_a_killed_write_are_found_and_removed(tmp_path: Path) -> None:
    handle, orphan = tempfile.mkstemp(prefix=".last.pth.", suffix=".tmp", dir=tmp_path)  # as atomic_write names it
    os.write(handle, b"x" * 10)
    os.close(handle)
    for name in ("last.pth", ".hidden.tmp", "notes.tmp"):  # not atomic_write's
        (tmp_path / name).write_text("keep")
    assert stale_temp_files(tmp_path) == [Path(orphan)]
    assert remove_stale_temp_files(tmp_path) == (1, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden.tmp", "last.pth", "notes.tmp"]
