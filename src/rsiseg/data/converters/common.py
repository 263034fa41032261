"""Pieces shared by the converters: finding and merging source COCO files, screening numbers,
refusing runs that would do nothing, and writing every output only once all of it is known.

Merging rule (what "read all the files" means): a release that ships ``*_train.json``,
``*_val.json`` and an all-images file holds each image more than once. Images are matched by
``file_name``; a repeat whose size and annotations (ids aside) agree is counted and merged, one
that disagrees is an error naming both files. Image and annotation ids are kept when they stay
unique, else renumbered 1..N (and counted).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsiseg.data.coco_index import DataError, number_problem, read_coco_json
from rsiseg.fileio import atomic_write

SKIP_HINT = "pass --skip-invalid to drop and count such annotations"
ANN_HINT = "pass --ann FILE to read only the file you mean"


@dataclass
class SourceReport:
    """What was read and what was dropped while reading converter sources.

    Attributes:
        read: source file -> ``{"images": entries in it, "new_images": images not in an earlier file}``.
        merged: what merging did without losing anything (repeated images, renumbered ids) -> count.
        skipped: reason -> count of annotations (or images) dropped.
        examples: reason -> up to 3 strings naming the file and annotation.
    """

    read: dict[str, dict[str, int]] = field(default_factory=dict)
    merged: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(example)

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, "merged": dict(self.merged), "skipped": dict(self.skipped),
                "skipped_examples": self.examples}


def require_source_dir(src: Path, what: str) -> Path:
    """``src`` itself, or :class:`DataError` when it is missing, not a folder or empty."""
    if not src.exists():
        raise DataError(f"{src}: source folder (--src) does not exist; it should hold {what}")
    if not src.is_dir():
        raise DataError(f"{src}: --src is not a folder; it should hold {what}")
    if next(src.iterdir(), None) is None:
        raise DataError(f"{src}: source folder (--src) is empty; it should hold {what}")
    return src


def find_annotation_files(src: Path, pattern: str = "*.json") -> list[Path]:
    """Every file matching ``pattern`` in ``src/annotations`` (when it has any), else in ``src``; sorted."""
    for folder in (src / "annotations", src):
        found = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if found:
            return found
    return []


def read_sources(paths: Sequence[Path], report: SourceReport, *, skip_invalid: bool = False) -> dict[str, Any]:
    """Read and merge COCO files; screen every annotation's numbers.

    Args:
        paths: COCO JSON files, in the order their ids are preferred.
        report: receives the per-file image counts and every dropped annotation.
        skip_invalid: drop and count annotations with non-finite or absurd numbers or an unknown
            image id, instead of raising.

    Returns:
        One COCO dict (other top-level keys from the first file).

    Raises:
        DataError: a malformed file, conflicting categories or image entries, or (without
            ``skip_invalid``) a bad annotation; the message names the file and the annotation.
    """
    merged: dict[str, Any] = {}
    categories: dict[int, tuple[dict[str, Any], Path]] = {}
    images: dict[str, tuple[dict[str, Any], list[dict[str, Any]], str, Path]] = {}
    for path in paths:
        coco = read_coco_json(path)
        merged = merged or {k: v for k, v in coco.items() if k not in ("images", "annotations")}
        _merge_categories(path, coco["categories"], categories)
        new = _add_images(path, coco["images"], _screen(path, coco, report, skip_invalid), images, report)
        report.read[str(path)] = {"images": len(coco["images"]), "new_images": new}
    merged["categories"] = [cat for cat, _ in categories.values()]
    merged["images"], merged["annotations"] = _assign_ids(list(images.values()), report)
    return merged


def _add_images(path: Path, entries: list[Any], anns: dict[int, list[Any]],
                images: dict[str, tuple[dict[str, Any], list[dict[str, Any]], Path]], report: SourceReport) -> int:
    """Add one file's images (keyed by file_name) to ``images``; returns how many were new."""
    new, ids = 0, set()
    for i, img in enumerate(entries):
        name = img.get("file_name") if isinstance(img, dict) else None
        if not isinstance(name, str) or type(img.get("id")) is not int:
            raise DataError(f"{path}: images[{i}] needs an integer 'id' and a string 'file_name'")
        if img["id"] in ids:  # its annotations could not be told apart
            raise DataError(f"{path}: images[{i}] ({name}) repeats image id {img['id']}")
        ids.add(img["id"])
        if name in images:  # signatures only for repeats: most sources repeat nothing
            first_img, first_anns, first_path = images[name]
            if _signature(first_img, first_anns) != _signature(img, anns.get(img["id"], [])):
                raise DataError(f"{path}: image {name!r} has a different size or annotations than in {first_path}; "
                                f"{ANN_HINT}")
            report.merged["repeated images (same size and annotations, kept once)"] += 1
            continue
        images[name] = (img, anns.get(img["id"], []), path)
        new += 1
    return new


def _merge_categories(path: Path, cats: list[Any], seen: dict[int, tuple[dict[str, Any], Path]]) -> None:
    """Add ``cats`` to ``seen`` (id -> first entry and its file); the same id must keep its name."""
    for i, cat in enumerate(cats):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            raise DataError(f"{path}: categories[{i}] needs an integer 'id' and a 'name'")
        first, first_path = seen.setdefault(cat["id"], (cat, path))
        if first["name"] != cat["name"]:
            raise DataError(f"{path}: category id {cat['id']} is {cat['name']!r} here but {first['name']!r} "
                            f"in {first_path}")


def _screen(path: Path, coco: dict[str, Any], report: SourceReport, skip_invalid: bool) -> dict[int, list[Any]]:
    """Annotations grouped by image id, with bad ones refused or (``skip_invalid``) dropped and counted."""
    by_id = {img["id"]: img for img in coco["images"] if isinstance(img, dict) and type(img.get("id")) is int}
    out: dict[int, list[Any]] = {}
    for i, ann in enumerate(coco["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or type(ann.get("id")) is not int:
            raise DataError(f"{where} needs an integer 'id'")
        where = f"{path}: annotation id {ann['id']}"
        image_id = ann.get("image_id")
        img = by_id.get(image_id) if type(image_id) is int else None
        if img is None:
            problem: tuple[str, str] | None = ("unknown image id", f"image_id {ann.get('image_id')!r} is in no image entry")
        elif not (isinstance(img.get("width"), int) and isinstance(img.get("height"), int)):
            raise DataError(f"{path}: image {img.get('file_name')!r} needs integer 'width' and 'height'")
        else:
            problem = number_problem(ann, img["width"], img["height"])
            where += f" (image {img.get('file_name')})"
        if problem is not None:
            if not skip_invalid:
                raise DataError(f"{where}: {problem[1]} ({SKIP_HINT})")
            report.add(problem[0], f"{where}: {problem[1]}")
            continue
        out.setdefault(ann["image_id"], []).append(ann)
    return out


def _signature(img: dict[str, Any], anns: list[dict[str, Any]]) -> str:
    """What must agree between two entries of the same image: its size and its annotations, ids aside."""
    body = sorted(json.dumps({k: v for k, v in a.items() if k not in ("id", "image_id")}, sort_keys=True)
                  for a in anns)
    return json.dumps([img.get("width"), img.get("height"), body])


def _assign_ids(entries: list[tuple[dict[str, Any], list[dict[str, Any]], Path]],
                report: SourceReport) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Image and annotation lists; the source ids are kept unless two entries would share one."""
    image_ids = [img["id"] for img, *_ in entries]
    keep_images = len(set(image_ids)) == len(image_ids)
    ann_ids = [a.get("id") for _, anns, *_ in entries for a in anns]
    keep_anns = len(set(ann_ids)) == len(ann_ids) and all(isinstance(i, int) for i in ann_ids)
    if not keep_images:
        report.merged["image ids renumbered (ids repeated across files)"] = len(entries)
    if not keep_anns:
        report.merged["annotation ids renumbered (ids repeated across files)"] = len(ann_ids)
    images, annotations = [], []
    for n, (img, anns, _) in enumerate(entries, start=1):
        image_id = img["id"] if keep_images else n
        images.append({**img, "id": image_id})
        for ann in anns:
            ann_id = ann["id"] if keep_anns else len(annotations) + 1
            annotations.append({**ann, "id": ann_id, "image_id": image_id})
    return images, annotations


def source_files(src: Path, ann: Iterable[str | Path] | None, pattern: str, what: str) -> list[Path]:
    """The files named by ``--ann`` (each must exist), else every ``pattern`` file found under ``src``."""
    if ann:
        paths = [Path(a) for a in ann]
        for path in paths:
            if not path.is_file():
                raise DataError(f"{path}: annotation file given with --ann not found")
        return paths
    require_source_dir(src, what)
    paths = find_annotation_files(src, pattern)
    if not paths:
        raise DataError(f"{src}: no {what} found (looked for annotations/{pattern} and {pattern})")
    return paths


def subset(coco: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """The images whose file_name is in ``names`` with their annotations; other keys are kept."""
    images = [img for img in coco["images"] if img["file_name"] in names]
    ids = {img["id"] for img in images}
    return {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}


def require_images(count: int, src: Path, what: str) -> None:
    """A run that finds no image must not report success."""
    if count == 0:
        raise DataError(f"{src}: no images found ({what}); nothing was written")


def write_splits(out: Path, name_pattern: str, splits: dict[str, dict[str, Any]],
                 report: SourceReport) -> dict[str, Any]:
    """Write ``OUT/annotations/<name_pattern with {split}>`` per split; returns the converter summary.

    Returns:
        ``{split: {"images": n, "instances": n}}`` plus ``report``'s ``read``, ``merged`` and ``skipped``.
    """
    write_outputs(out, {f"annotations/{name_pattern.format(split=s)}": coco for s, coco in splits.items()})
    summary: dict[str, Any] = {s: {"images": len(c["images"]), "instances": len(c["annotations"])}
                               for s, c in splits.items()}
    return summary | report.to_dict()


def write_outputs(out: Path, files: dict[str, Any]) -> None:
    """Write ``{relative path: JSON-ready object}`` under ``out``, each atomically.

    Called once everything is computed, so a refused run leaves no partial output.
    """
    for rel, obj in files.items():
        atomic_write(out / rel, lambda handle, obj=obj: json.dump(obj, handle))
