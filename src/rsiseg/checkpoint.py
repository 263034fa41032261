"""Atomic checkpoints that load with ``weights_only=True``.

A checkpoint holds ``{model, optimizer, scheduler, scaler, epoch, iteration, rng_state,
config, metrics}``; the resolved config inside it is all ``eval`` and ``predict`` need.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsiseg.fileio import atomic_write


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, then ``os.replace``.

    A run killed while saving leaves the previous checkpoint intact.
    """
    atomic_write(path, lambda handle: torch.save(state, handle), binary=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on CPU without executing any pickled code.

    Raises:
        FileNotFoundError: naming the path.
        ValueError: the file is not a readable rsiseg checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path}: not an rsiseg checkpoint (needs 'model' and 'config')")
    return state


def rng_state() -> dict[str, Any]:
    """All random generator states, as tensors and plain types that ``weights_only`` accepts."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        ("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"], np_state["cached"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
