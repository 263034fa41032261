"""HRSID (SAR ships) in either of its published forms.

* The COCO release: ``SRC/annotations/*.json`` (e.g. ``train2017.json``, ``test2017.json``) beside
  ``SRC/images`` (or only the files given as ``ann``). Each file is checked as COCO, its numbers
  screened, and written as ``hrsid_instances_<stem>.json`` with ``file_name`` as in the source
  (relative to the release's image folder).
* The PNG id-mask variant (``*_instance_id_RGB.png`` + ``*_instance_color_RGB.png``, ships in
  (128, 0, 0)): converted like iSAID, see :mod:`rsiseg.data.converters.isaid`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rsiseg.data.coco_index import DataError
from rsiseg.data.converters.common import SourceReport, read_sources, require_images, require_source_dir, write_outputs
from rsiseg.data.converters.isaid import HRSID_CLASSES, convert_isaid

WHAT = "HRSID: *_instance_id_RGB.png masks or COCO JSON files (annotations/*.json)"


def convert_hrsid(src: str | Path, out: str | Path, *, min_area: int = 1, progress: bool = True,
                  ann: Sequence[str | Path] | None = None, skip_invalid: bool = False) -> dict[str, Any]:
    """Convert whichever HRSID form ``src`` holds; PNG id masks win when both are present.

    Args:
        src: the release folder.
        out: output folder.
        min_area: PNG form: instances with fewer pixels are skipped and counted.
        progress: PNG form: show a tqdm bar.
        ann: COCO form: convert only these files instead of every JSON under ``src``.
        skip_invalid: COCO form: drop and count annotations with non-finite or absurd numbers.

    Returns:
        The PNG converter's summary, or ``{"files": {file: {"images", "instances"}}, "read", "skipped"}``
        for COCO files.
    """
    src, out = Path(src), Path(out)
    if not ann and next(require_source_dir(src, WHAT).rglob("*_instance_id_RGB.png"), None) is not None:
        summary = convert_isaid(src, out, min_area=min_area, progress=progress, classes=HRSID_CLASSES)
        return {k: summary[k] for k in ("images", "instances", "skipped", "per_class")}
    folder = src / "annotations" if (src / "annotations").is_dir() else src
    sources = [Path(a) for a in ann] if ann else sorted(folder.glob("*.json"))
    if not sources:
        raise DataError(f"{src}: neither *_instance_id_RGB.png masks nor COCO JSON files (annotations/*.json) found")
    report, outputs = SourceReport(), {}
    for path in sources:
        if not path.is_file():
            raise DataError(f"{path}: annotation file given with --ann not found")
        outputs[f"annotations/hrsid_instances_{path.stem}.json"] = read_sources([path], report, skip_invalid=skip_invalid)
    require_images(sum(len(c["images"]) for c in outputs.values()), src, "the COCO JSON files list no image")
    write_outputs(out, outputs)
    files = {Path(name).name: {"images": len(c["images"]), "instances": len(c["annotations"])}
             for name, c in outputs.items()}
    return {"files": files} | report.to_dict()
