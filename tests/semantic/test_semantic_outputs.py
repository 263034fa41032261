"""Confusion-matrix metrics against a hand-computed example, and the prediction outputs
(colours, PNG and GeoTIFF masks with copied geo tags, the results figure)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tifffile
import torch

from rsiseg.data.converters.potsdam import POTSDAM_CLASSES, POTSDAM_PALETTE
from rsiseg.evaluation.semantic import ConfusionMatrix, format_semantic_table
from rsiseg.inference.semantic_output import (
    colorize,
    is_georeferenced,
    palette_for,
    results_figure,
    write_index_mask,
)

NAMES = ["road", "building", "tree", "car"]


def test_confusion_matrix_metrics_by_hand():
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(torch.tensor([[0, 1, 1], [1, 1, 0]]), torch.tensor([[0, 0, 1], [1, 2, 255]]))
    # rows = truth, cols = prediction (the ignored pixel is left out):
    #   road:     1 right, 1 as building     building: 2 right     tree: 1 as building     car: absent
    assert cm.matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    stats = cm.metrics(NAMES)["semantic"]
    # IoU = TP / (GT + Pred - TP): road 1/(2+1-1) = 0.5, building 2/(2+4-2) = 0.5, tree 0/(1+0-0) = 0
    assert stats["per_class_IoU"] == {"road": 0.5, "building": 0.5, "tree": 0.0, "car": None}
    assert stats["mIoU"] == pytest.approx(1 / 3)
    assert stats["accuracy"] == pytest.approx(3 / 5)
    assert stats["mean_accuracy"] == pytest.approx((1 / 2 + 2 / 2 + 0 / 1) / 3)
    table = format_semantic_table(cm.metrics(NAMES))
    assert "| mIoU | 33.3 |" in table and "| IoU car | - |" in table and "| accuracy | 60.0 |" in table


def test_confusion_matrix_rejects_bad_input():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="differ in size"):
        cm.update(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="outside 0..1"):
        cm.update(torch.full((2, 2), 2), torch.zeros(2, 2, dtype=torch.int64))
    assert ConfusionMatrix(2).metrics(["a", "b"])["semantic"]["mIoU"] is None


def test_prediction_colours(tmp_path):
    pred = np.array([[0, 1, 2], [3, 4, 5], [255, 0, 7]], np.uint8)
    rgb = colorize(pred, POTSDAM_PALETTE)
    for value, colour in zip(range(6), POTSDAM_PALETTE):
        assert all(tuple(rgb[r, c]) == colour for r, c in zip(*np.nonzero(pred == value)))
    assert tuple(rgb[2, 0]) == (0, 0, 0) and tuple(rgb[2, 2]) == (0, 0, 0)
    path = write_index_mask(tmp_path / "mask.png", pred)
    assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), pred)


def test_geotiff_tags_are_copied(tmp_path):
    source = tmp_path / "scene.tif"
    geo = [(33550, "d", 3, (0.5, 0.5, 0.0), True), (33922, "d", 6, (0, 0, 0, 500000.0, 5800000.0, 0), True),
           (34735, "H", 8, (1, 1, 0, 1, 1024, 0, 1, 1), True), (34737, "s", None, "WGS 84 / UTM 33N|", True)]
    tifffile.imwrite(source, np.zeros((3, 5, 3), np.uint8), extratags=geo)
    assert is_georeferenced(source) and not is_georeferenced(tmp_path / "mask.png")
    mask = np.arange(15, dtype=np.uint8).reshape(3, 5) % 6
    path = write_index_mask(tmp_path / "mask.png", mask, georef_from=source)
    assert path.suffix == ".tif"
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        assert np.array_equal(tif.asarray(), mask)
        assert tuple(tags[33550].value) == (0.5, 0.5, 0.0)
        assert tuple(tags[33922].value) == (0, 0, 0, 500000.0, 5800000.0, 0)
        assert tuple(tags[34735].value) == (1, 1, 0, 1, 1024, 0, 1, 1)
        assert tags[34737].value.startswith("WGS 84")
    with pytest.raises(ValueError, match="does not match the grid"):
        write_index_mask(tmp_path / "other.png", np.zeros((4, 4), np.uint8), georef_from=source)


def test_results_figure(tmp_path):
    gt = np.zeros((20, 30), np.uint8)
    gt[:, 15:] = 1
    image = np.full((20, 30, 3), 120, np.uint8)
    path = results_figure(tmp_path / "fig.png", image, gt, np.array([[2, 2], [10, 20]]), gt, POTSDAM_PALETTE,
                          POTSDAM_CLASSES)
    figure = cv2.imread(str(path))
    assert figure is not None and figure.shape[1] > 4 * 30 and not list(tmp_path.glob(".*.tmp"))


def test_palette_for():
    assert palette_for(POTSDAM_CLASSES) == list(POTSDAM_PALETTE)
    assert palette_for(["a", "b"], [[1, 2, 3], [4, 5, 6], [7, 8, 9]]) == [(1, 2, 3), (4, 5, 6)]
    generated = palette_for(["a", "b", "c"])
    assert len(set(generated)) == 3
    with pytest.raises(ValueError, match="for each of the 2 classes"):
        palette_for(["a", "b"], [[1, 2, 3]])
