"""The semantic dataset (pairing, resizing, sparse labels, augmentation, bad input), the Potsdam
palette round trip, class weights and the synthetic scenes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

from rsiseg.config import PointsConfig
from rsiseg.data.class_weights import compute_class_weights, load_class_weights, write_class_weights
from rsiseg.data.coco_index import DataError
from rsiseg.data.converters.potsdam import POTSDAM_PALETTE, index_to_rgb, rgb_to_index
from rsiseg.data.loader import collate
from rsiseg.data.semantic import SemanticDataset, pair_key
from rsiseg.data.synthetic_semantic import write_synthetic_semantic_dataset


def _write(path: Path, array: np.ndarray) -> Path:
    """PNG through OpenCV (BGR order), TIFF through tifffile (RGB order, uncompressed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tif":
        tifffile.imwrite(path, array)
    else:
        assert cv2.imwrite(str(path), array)
    return path


def _potsdam_pair(root: Path, name: str, index: np.ndarray) -> None:
    """An RGB tile and its ISPRS colour label, named as Potsdam names them."""
    rng = np.random.default_rng(0)
    _write(root / "images" / f"top_potsdam_{name}_RGB.tif", rng.integers(0, 255, (*index.shape, 3), dtype=np.uint8))
    _write(root / "labels" / f"top_potsdam_{name}_label.tif", index_to_rgb(index))


def test_palette_round_trip():
    index = np.arange(36, dtype=np.uint8).reshape(6, 6) % 7  # 6 = undefined
    index[0, 0] = 255
    rgb = index_to_rgb(index)
    assert rgb.dtype == np.uint8 and rgb.shape == (6, 6, 3)
    assert tuple(rgb[0, 1]) == POTSDAM_PALETTE[1] and tuple(rgb[0, 0]) == (0, 0, 0)
    assert np.array_equal(rgb_to_index(rgb), np.where(index < 6, index, 255))


def test_pair_keys():
    assert pair_key("top_potsdam_2_10_RGB.tif") == pair_key("top_potsdam_2_10_label.tif") == "top_potsdam_2_10"
    assert pair_key("top_potsdam_2_10_IRRG.tif") == pair_key("top_potsdam_2_10_label_noBoundary.tif")
    assert pair_key("Image_12.tif") == pair_key("Label_12.tif") == "12"
    assert pair_key("a.png") != pair_key("b.png")


def test_potsdam_names_resize_and_dense_labels(tmp_path):
    index = np.zeros((40, 40), np.uint8)
    index[:, 20:] = 1
    index[:10] = 4
    _potsdam_pair(tmp_path, "2_10", index)
    _potsdam_pair(tmp_path, "2_11", np.full((40, 40), 3, np.uint8))
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    ds = SemanticDataset(tmp_path / "images", tmp_path / "labels", in_channels=3, label_format="potsdam_rgb",
                         image_size=20)
    assert ds.num_classes == 6 and ds.class_names[1] == "building"
    assert ds.names == ["top_potsdam_2_10_RGB.tif", "top_potsdam_2_11_RGB.tif"]
    image, target = ds[0]
    assert image.shape == (3, 20, 20) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert target["labels"].dtype == torch.int64 and target["labels"].shape == (20, 20)
    assert target["labels"][0, 0] == 4 and target["labels"][15, 15] == 1 and target["labels"][15, 0] == 0
    assert int(target["image_id"]) == 0
    assert "skipped 1 non-image file(s), e.g. notes.txt" in ds.summary()
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == len(targets) == 2


def test_points_sparse_and_stable_across_epochs(tmp_path):
    out = write_synthetic_semantic_dataset(tmp_path, images=4, size=48, seed=1)
    points = PointsConfig(count=30, fraction=None, sampling="stratified", seed=5)
    ds = SemanticDataset(out["train_images"], out["train_labels"], in_channels=3, image_size=32, points=points,
                         hflip=0.5, vflip=0.5, rot90=0.5, seed=2)
    assert ds.class_names[0] == "impervious_surfaces"  # read from out/classes.json
    labels = ds[(0, 0)][1]["labels"]
    assert int((labels != 255).sum()) == 30
    coords = ds.point_coords(0)
    dense = ds.dense_labels(0)
    assert coords.shape == (30, 2) and dense.shape == (32, 32)
    again = SemanticDataset(out["train_images"], out["train_labels"], in_channels=3, image_size=32, points=points)
    assert np.array_equal(again.point_coords(0), coords)  # same points in a new process / resumed run
    # The augmentation depends on (seed, epoch, index) only, and moves labels with the image.
    assert torch.equal(ds[(0, 3)][0], ds[(0, 3)][0]) and torch.equal(ds[(0, 3)][1]["labels"], ds[(0, 3)][1]["labels"])
    epochs = [ds[(0, e)][1]["labels"] for e in range(6)]
    assert any(not torch.equal(epochs[0], e) for e in epochs[1:])
    assert all(int((e != 255).sum()) == 30 for e in epochs)
    assert "labelled points per image" in ds.summary()


def test_point_file_scaled_to_resized_grid(tmp_path):
    _write(tmp_path / "images" / "a.png", np.zeros((40, 40, 3), np.uint8))
    _write(tmp_path / "labels" / "a.png", np.zeros((40, 40), np.uint8))
    (tmp_path / "points.csv").write_text("image,x,y,class\na.png,39,0,1\na.png,10,20,0\n")
    points = PointsConfig(file=str(tmp_path / "points.csv"))
    ds = SemanticDataset(tmp_path / "images", tmp_path / "labels", in_channels=1, image_size=20, points=points,
                         class_names=["a", "b"])
    assert ds.point_coords(0).tolist() == [[0, 19], [10, 5]]
    labels = ds[0][1]["labels"]
    assert labels[0, 19] == 1 and labels[10, 5] == 0 and int((labels != 255).sum()) == 2
    (tmp_path / "points.csv").write_text("image,x,y,class\na.png,40,0,1\n")
    with pytest.raises(DataError, match=r"points.csv: image a.png: 1 point\(s\) outside the 40 x 40 image"):
        SemanticDataset(tmp_path / "images", tmp_path / "labels", in_channels=1, points=points,
                        class_names=["a", "b"])[0]


@pytest.mark.parametrize("problem", ["no_label", "no_image", "bad_value", "size"])
def test_bad_input_names_the_file(tmp_path, problem):
    _write(tmp_path / "images" / "a.png", np.zeros((16, 16, 3), np.uint8))
    _write(tmp_path / "labels" / "a.png", np.ones((16, 16), np.uint8))
    (tmp_path / "labels" / "classes.json").write_text(json.dumps({"names": ["x", "y"], "ignore_index": 255}))
    expected = {"no_label": "b.png: no label map", "no_image": "c.png: label map without an image",
                "bad_value": r"a.png: label value\(s\) \[7\]", "size": "a.png: size"}[problem]
    if problem == "no_label":
        _write(tmp_path / "images" / "b.png", np.zeros((16, 16, 3), np.uint8))
    elif problem == "no_image":
        _write(tmp_path / "labels" / "c.png", np.zeros((16, 16), np.uint8))
    elif problem == "bad_value":
        _write(tmp_path / "labels" / "a.png", np.full((16, 16), 7, np.uint8))
    else:
        _write(tmp_path / "labels" / "a.png", np.ones((8, 16), np.uint8))
    with pytest.raises(DataError, match=expected):
        SemanticDataset(tmp_path / "images", tmp_path / "labels", in_channels=3)[0]


def test_class_weights_round_trip(tmp_path):
    labels = np.zeros((10, 10), np.uint8)
    labels[:2] = 1  # class 0: 80 px, class 1: 20 px, class 2 absent
    labels[0, 0] = 255
    _write(tmp_path / "labels" / "a.png", labels)
    result = compute_class_weights(tmp_path / "labels", "index", 3)
    assert result["counts"] == [80, 19, 0] and result["absent"] == ["class_2"] and result["ignored"] == 1
    # inverse frequencies 99/80 and 99/19, scaled to mean 1 over the two present classes
    w0, w1 = 99 / 80, 99 / 19
    assert result["weights"] == pytest.approx([2 * w0 / (w0 + w1), 2 * w1 / (w0 + w1), 0.0])
    path = write_class_weights(tmp_path / "weights.json", result)
    assert torch.allclose(load_class_weights(path, 3), torch.tensor(result["weights"], dtype=torch.float32))
    with pytest.raises(ValueError, match=r"weights.json: field 'weights' must list 4 numbers"):
        load_class_weights(path, 4)
    for bad, match in (({"names": []}, "field 'weights' is missing"),
                       ({"weights": [1, -1, 0]}, r"weights\[1\]' is neg"),
                       ({"weights": [1, "x", 0]}, r"weights\[1\]' is not a finite")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            load_class_weights(path, 3)
    _write(tmp_path / "labels" / "b.png", np.full((4, 4), 9, np.uint8))
    with pytest.raises(DataError, match=r"b.png: label value\(s\) \[9\]"):
        compute_class_weights(tmp_path / "labels", "index", 3)


def test_synthetic_scenes_are_deterministic_and_varied(tmp_path):
    first = write_synthetic_semantic_dataset(tmp_path / "a", images=4, size=64, seed=3)
    second = write_synthetic_semantic_dataset(tmp_path / "b", images=4, size=64, seed=3)
    assert first["train"] + first["val"] == 4 and first["val"] == 1
    names = sorted(p.name for p in first["train_labels"].iterdir())
    for name in names:
        assert (first["train_images"] / name).read_bytes() == (second["train_images"] / name).read_bytes()
    labels = np.stack([cv2.imread(str(first["train_labels"] / n), cv2.IMREAD_UNCHANGED) for n in names])
    assert labels.dtype == np.uint8 and set(np.unique(labels)) >= {0, 1, 2, 3}
    assert json.loads(first["classes"].read_text())["names"][4] == "car"
    assert not list(tmp_path.glob("a/.*partial*"))
