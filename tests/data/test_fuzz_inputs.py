"""Seeded fuzzing of the COCO reader, ``validate`` and the COCO-based converters (hypothesis is not
installed): malformed inputs may only ever end in the library's own :class:`DataError`."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from rsiseg.data.coco_index import DataError, load_coco_index
from rsiseg.data.converters.nwpu import convert_nwpu
from rsiseg.data.converters.yolo import convert_yolo
from rsiseg.data.validate import fix_coco, validate_coco

ODD_VALUES = [None, float("nan"), float("inf"), -1, 0, 10**12, 1.5, "7", True, [], {}, [1, 2], [[0, 0, 1]],
              {"size": [2, 2], "counts": "x"}, [[0, 0, 1e9, 0, 5, 5]], [float("nan")] * 6]


def _valid() -> dict[str, Any]:
    return {"images": [{"id": i, "file_name": f"{i:03d}.png", "height": 16, "width": 16} for i in (1, 2)],
            "annotations": [{"id": k, "image_id": 1 + k % 2, "category_id": 1, "bbox": [2, 2, 6, 6], "area": 36.0,
                             "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]], "iscrowd": 0} for k in (1, 2, 3)],
            "categories": [{"id": 1, "name": "ship"}]}


def _mutate(coco: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Replace one to three fields (or whole entries) of images, annotations or categories with odd values."""
    coco = copy.deepcopy(coco)
    for _ in range(rng.randint(1, 3)):
        section = rng.choice(["images", "annotations", "categories"])
        k = rng.randrange(len(coco[section]))
        if rng.random() < 0.15:
            coco[section][k] = copy.deepcopy(rng.choice(ODD_VALUES))
        elif isinstance(coco[section][k], dict) and coco[section][k]:
            entry = coco[section][k]
            entry[rng.choice(sorted(entry))] = copy.deepcopy(rng.choice(ODD_VALUES))
    return coco


@pytest.mark.parametrize("seed", range(40))
def test_malformed_coco_only_raises_data_error(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    for name in ("001.png", "002.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    for trial in range(5):
        ann_file = tmp_path / "annotations" / f"t{trial}.json"
        ann_file.parent.mkdir(exist_ok=True)
        ann_file.write_text(json.dumps(_mutate(_valid(), rng)))
        for repair in (False, True):
            try:
                load_coco_index(ann_file, tmp_path, repair=repair)
            except DataError:
                pass
        validate_coco(ann_file, tmp_path, progress=False)
        fix_coco(ann_file)
        try:
            convert_nwpu(tmp_path, tmp_path / f"out{trial}", ann=[ann_file], skip_invalid=rng.random() < 0.5)
        except DataError:
            pass


TOKENS = ["0", "1", "7", "-1", "0.5", "0.1", "0.9", "1.0", "0.0", "1.7", "-0.3", "nan", "inf", "-inf", "1e9", "x", "0.5"]


@pytest.mark.parametrize("seed", range(10))
def test_random_yolo_labels_convert_to_valid_coco(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "train" / "a.png")
    lines = [" ".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 11))) for _ in range(30)]
    (tmp_path / "labels" / "train" / "a.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [car, ship]\n")
    summary = convert_yolo(tmp_path, tmp_path / "out")
    kept = summary["splits"]["train"]["instances"]
    assert kept + sum(v for k, v in summary["problems"].items() if "skipped" in k) == 30
    report = validate_coco(tmp_path / "out" / "annotations" / "instances_train.json", tmp_path, progress=False)
    assert report.ok, report.summary()
