"""HRSID (SAR ships) in either of its published forms.

* The COCO release: ``SRC/annotations/*.json`` (e.g. ``train2017.json``, ``test2017.json``) beside
  ``SRC/images``. Each file is checked as COCO and written as ``hrsid_instances_<stem>.json``.
* The PNG id-mask variant (``*_instance_id_RGB.png`` + ``*_instance_color_RGB.png``, ships in
  (128, 0, 0)): converted like iSAID, see :mod:`rsiseg.data.converters.isaid`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rsiseg.data.coco_index import DataError, read_coco_json
from rsiseg.data.converters.isaid import HRSID_CLASSES, convert_isaid


def convert_hrsid(src: str | Path, out: str | Path, *, min_area: int = 1, progress: bool = True) -> dict[str, Any]:
    """Convert whichever HRSID form ``src`` holds; PNG id masks win when both are present.

    Returns:
        The PNG converter's summary, or ``{file: {"images": n, "instances": n}}`` for COCO files.
    """
    src, out = Path(src), Path(out)
    if next(src.rglob("*_instance_id_RGB.png"), None) is not None:
        summary = convert_isaid(src, out, min_area=min_area, progress=progress, classes=HRSID_CLASSES)
        return {k: summary[k] for k in ("images", "instances", "skipped", "per_class")}
    folder = src / "annotations" if (src / "annotations").is_dir() else src
    sources = sorted(folder.glob("*.json"))
    if not sources:
        raise DataError(f"{src}: neither *_instance_id_RGB.png masks nor COCO JSON files (annotations/*.json) found")
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    summary = {}
    for path in sources:
        coco = read_coco_json(path)
        name = f"hrsid_instances_{path.stem}.json"
        (out / "annotations" / name).write_text(json.dumps(coco))
        summary[name] = {"images": len(coco["images"]), "instances": len(coco["annotations"])}
    return summary
