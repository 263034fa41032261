"""Atomic file writes: a temp file in the destination folder, fsync, then ``os.replace``.

A reader, or a run killed mid-write, never sees a half-written file: the old one stays intact.
A process killed outright (SIGKILL, power loss) can leave its temp file behind; such files are
named ``.<name>.<8 random chars>.tmp`` and :func:`remove_stale_temp_files` clears them.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# The names tempfile.mkstemp gives with the prefix and suffix atomic_write uses.
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], binary: bool = False) -> Path:
    """Call ``write(handle)`` on a temp file, then move it to ``path``; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def stale_temp_files(folder: str | Path) -> list[Path]:
    """The temp files :func:`atomic_write` left in ``folder`` (not its subfolders) when killed mid-write."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _TEMP_NAME.fullmatch(p.name) and p.is_file())


def remove_stale_temp_files(folder: str | Path) -> tuple[int, int]:
    """Delete :func:`stale_temp_files`; returns how many files and bytes were removed.

    Call it only where no other process is writing into ``folder``.
    """
    count = size = 0
    for path in stale_temp_files(folder):
        size += path.stat().st_size
        path.unlink(missing_ok=True)
        count += 1
    return count, size


def remove_path(path: str | Path) -> bool:
    """Remove a file or a whole folder; False when there was nothing at ``path``."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    else:
        return False
    return True
