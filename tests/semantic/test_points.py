"""Point sampling (counts, determinism, stratification) and point files (CSV, GeoJSON, bad input)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rsiseg.config import PointsConfig
from rsiseg.data.coco_index import DataError
from rsiseg.data.points import count_for, read_point_file, sample_points, sparse_label_map


def _labels() -> np.ndarray:
    """40 x 40: class 1 on 400 px, class 2 on 10 px, class 0 on 790 px, the bottom 400 px ignored."""
    labels = np.zeros((40, 40), np.uint8)
    labels[:10] = 1
    labels[10, :10] = 2
    labels[30:] = 255
    return labels


def test_uniform_count_distinct_labelled_and_deterministic():
    labels = _labels()
    points = sample_points(labels, 100, "uniform", seed=3, key="a.png")
    assert points.shape == (100, 2) and points.dtype == np.int64
    assert len({tuple(p) for p in points.tolist()}) == 100
    assert (labels[points[:, 0], points[:, 1]] != 255).all()
    assert np.array_equal(points, sample_points(labels, 100, "uniform", seed=3, key="a.png"))
    assert not np.array_equal(points, sample_points(labels, 100, "uniform", seed=3, key="b.png"))
    assert not np.array_equal(points, sample_points(labels, 100, "uniform", seed=4, key="a.png"))


def test_count_is_capped_by_labelled_pixels():
    labels = _labels()
    labelled = int((labels != 255).sum())
    assert len(sample_points(labels, 10_000, "uniform", 0, "a")) == labelled
    assert len(sample_points(labels, 10_000, "stratified", 0, "a")) == labelled
    assert len(sample_points(np.full((4, 4), 255, np.uint8), 5, "uniform", 0, "a")) == 0
    assert len(sample_points(np.full((4, 4), 255, np.uint8), 5, "stratified", 0, "a")) == 0


def test_stratified_equal_share_and_small_class_gives_all():
    labels = _labels()
    points = sample_points(labels, 90, "stratified", 0, "a")
    counts = np.bincount(labels[points[:, 0], points[:, 1]], minlength=3)
    # class 2 has 10 px (all taken); the other 80 split equally between classes 0 and 1.
    assert counts.tolist() == [40, 40, 10]
    assert counts.sum() == 90
    uneven = sample_points(labels, 31, "stratified", 0, "a")
    assert np.bincount(labels[uneven[:, 0], uneven[:, 1]], minlength=3).tolist() in ([10, 11, 10], [11, 10, 10])


def test_count_for_count_wins_over_fraction():
    assert count_for(PointsConfig(count=7, fraction=0.5), (10, 10)) == 7
    assert count_for(PointsConfig(count=None, fraction=0.25), (10, 10)) == 25
    assert count_for(PointsConfig(count=None, fraction=1e-6), (10, 10)) == 1
    with pytest.raises(ValueError, match="count or a fraction"):
        count_for(PointsConfig(count=None, fraction=None), (10, 10))


def test_sparse_label_map_keeps_only_points():
    labels = _labels()
    points = np.array([[0, 0], [12, 5], [10, 3]])
    sparse = sparse_label_map(labels, points, 255)
    assert sparse.dtype == np.uint8 and (sparse != 255).sum() == 3
    assert sparse[0, 0] == 1 and sparse[12, 5] == 0 and sparse[10, 3] == 2


def test_read_csv_and_geojson(tmp_path):
    csv_path = tmp_path / "points.csv"
    csv_path.write_text("image,x,y,class\ntile_1.tif,3,5,1\ntile_1.tif,7.9,0,building\ntile_2.png,0,0,0\n")
    points = read_point_file(csv_path, ["road", "building"])
    coords, classes = points["tile_1.tif"]
    assert coords.tolist() == [[5, 3], [0, 7]] and classes.tolist() == [1, 1]
    assert points["tile_2.png"][1].tolist() == [0]
    geojson = tmp_path / "points.geojson"
    features = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [2, 4]},
                 "properties": {"image": "tile_1.tif", "class": "road"}}]
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    coords, classes = read_point_file(geojson, ["road", "building"])["tile_1.tif"]
    assert coords.tolist() == [[4, 2]] and classes.tolist() == [0]


@pytest.mark.parametrize(("text", "match"), [
    ("image,x,y,class\na.tif,1,,0\n", "line 2: field 'y' is missing"),
    ("image,x,y,class\na.tif,1,2,0\na.tif,nan,2,0\n", "line 3: field 'x' is not a finite number"),
    ("image,x,y,class\na.tif,1,-2,0\n", "line 2: field 'y' is negative"),
    ("image,x,y,class\na.tif,1,2,water\n", "line 2: field 'class': unknown class 'water'"),
    ("image,x,y,class\na.tif,1,2,5\n", "line 2: field 'class': class index '5'"),
    ("image,x,class\na.tif,1,0\n", "line 1: .*lacks field"),
])
def test_bad_csv_names_file_line_and_field(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as info:
        read_point_file(path, ["road", "building"])
    assert str(path) in str(info.value)


def test_bad_geojson_names_feature_and_field(tmp_path):
    path = tmp_path / "bad.geojson"
    feature = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, "properties": {"class": 0}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    with pytest.raises(DataError, match=r"bad.geojson: feature 0: field 'properties.image' is missing"):
        read_point_file(path)
