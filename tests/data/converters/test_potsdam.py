"""ISPRS Potsdam converter: exact palette mapping, undefined colours counted and set to 255."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from rsiseg.data.coco_index import DataError
from rsiseg.data.converters.potsdam import POTSDAM_CLASSES, POTSDAM_PALETTE, convert_potsdam, rgb_to_index


def tile() -> np.ndarray:
    rgb = np.zeros((3, 4, 3), dtype=np.uint8)
    colours = list(POTSDAM_PALETTE) + [(10, 20, 30), (254, 255, 255)] + list(POTSDAM_PALETTE[:4])
    for k, colour in enumerate(colours):
        rgb[k // 4, k % 4] = colour
    return rgb


EXPECTED = np.array([[0, 1, 2, 3], [4, 5, 255, 255], [0, 1, 2, 3]], dtype=np.uint8)


def test_rgb_to_index_exact() -> None:
    assert POTSDAM_CLASSES[1] == "building" and len(POTSDAM_CLASSES) == 6
    np.testing.assert_array_equal(rgb_to_index(tile()), EXPECTED)
    with pytest.raises(ValueError):
        rgb_to_index(np.zeros((3, 4), dtype=np.uint8))


def test_convert_writes_masks_and_counts(tmp_path: Path) -> None:
    src = tmp_path / "src" / "5_Labels_all"
    src.mkdir(parents=True)
    assert cv2.imwrite(str(src / "top_potsdam_2_10_label.tif"), cv2.cvtColor(tile(), cv2.COLOR_RGB2BGR))
    Image.fromarray(np.full((2, 2, 3), (0, 255, 0), dtype=np.uint8)).save(src / "top_potsdam_2_11_label.png")
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(src / "top_potsdam_2_11_RGB.png")  # not a label
    summary = convert_potsdam(tmp_path / "src", tmp_path / "out")
    assert summary == {"masks": 2, "undefined": 2,
                       "pixels": {"impervious_surfaces": 2, "building": 2, "low_vegetation": 2, "tree": 2 + 4,
                                  "car": 1, "clutter": 1}}
    mask = np.array(Image.open(tmp_path / "out" / "masks" / "top_potsdam_2_10_label.png"))
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, EXPECTED)
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == [
        "top_potsdam_2_10_label.png", "top_potsdam_2_11_label.png"]
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert classes["names"] == list(POTSDAM_CLASSES) and classes["ignore_index"] == 255
    assert classes["palette"][1] == [0, 0, 255]


def test_no_labels_raises(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no labels here")
    with pytest.raises(DataError, match="no Potsdam label tiles"):
        convert_potsdam(tmp_path, tmp_path / "out")
