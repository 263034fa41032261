"""Pieces shared by the converters that start from a COCO JSON (SSDD, NWPU VHR-10)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def find_source_json(src: Path, pattern: str) -> Path | None:
    """The first JSON matching ``pattern`` in ``src/annotations`` or ``src``."""
    for folder in (src / "annotations", src):
        found = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if found:
            return found[0]
    return None


def subset(coco: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """The images whose file_name is in ``names`` with their annotations; other keys are kept."""
    images = [img for img in coco["images"] if img["file_name"] in names]
    ids = {img["id"] for img in images}
    return {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
