"""Instance points (PointSAM prompts): inside the mask, repeatable, one per object, read back, named errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from rsiseg.commands import data_points
from rsiseg.data.coco_index import DataError
from rsiseg.data.instance_points import (
    instance_points,
    interior_point,
    points_from_coco,
    read_instance_points,
    write_points_json,
)
from rsiseg.masks import Bitmap, InstanceMasks


def disk(size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    return ((rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2).astype(np.uint8)


def shapes() -> dict[str, np.ndarray]:
    """Masks whose farthest-from-border pixel is easy to get wrong."""
    holes = np.ones((20, 20), np.uint8)
    holes[8:12, 8:12] = 0  # the middle is a hole
    holes[3:5, 14:17] = 0
    ring = disk(31, 15, 15, 14) - disk(31, 15, 15, 9)
    ell = np.zeros((20, 20), np.uint8)
    ell[:, :4] = 1
    ell[16:, :] = 1
    edge = disk(20, 0, 10, 7)  # a half disk cut by the top edge
    diagonal = np.eye(9, dtype=np.uint8)
    return {"holes": holes, "ring": ring, "L": ell, "edge": edge, "diagonal": diagonal,
            "pixel": np.ones((1, 1), np.uint8), "rectangle": np.ones((7, 11), bool)}


@pytest.mark.parametrize("name", list(shapes()))
def test_the_point_lies_inside_the_mask_for_both_rules(name: str) -> None:
    mask = shapes()[name]
    col, row = interior_point(mask, "center")
    assert mask[row, col]
    for seed in range(20):
        col, row = interior_point(mask, "random", np.random.default_rng(seed))
        assert mask[row, col]


def test_center_is_the_middle_of_a_rectangle_and_keeps_away_from_the_image_edge() -> None:
    assert interior_point(np.ones((7, 11), np.uint8)) == (5, 3)
    assert interior_point(np.ones((5, 20), np.uint8)) == (9, 2)  # even width: the first of the two middles
    col, row = interior_point(shapes()["edge"])
    assert row >= 3 and col == 10  # the disk's centre sits on the edge; the point moves inwards
    col, row = interior_point(shapes()["ring"])
    assert 9 < np.hypot(row - 15, col - 15) <= 14  # in the band, not in the hole


def test_interior_point_refuses_empty_masks_and_bad_rules() -> None:
    with pytest.raises(ValueError, match="empty"):
        interior_point(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="rng"):
        interior_point(np.ones((4, 4), np.uint8), "random")
    with pytest.raises(ValueError, match="rule"):
        interior_point(np.ones((4, 4), np.uint8), "centroid")


def test_instance_points_are_pixel_centres_in_image_coordinates_and_repeatable() -> None:
    masks = InstanceMasks([Bitmap(np.ones((7, 11), np.uint8), 10, 20), Bitmap(np.zeros((0, 0), np.uint8), 0, 0),
                           Bitmap(shapes()["ring"], 30, 5)], 64, 64)
    center = instance_points(masks, "center")
    assert center[0].tolist() == [15.5, 23.5]
    assert np.isnan(center[1]).all()
    full = masks.to_full().numpy()
    for rule in ("center", "random"):
        first = instance_points(masks, rule, seed=3, key="a.png")
        np.testing.assert_array_equal(first, instance_points(masks, rule, seed=3, key="a.png"))
        for i in (0, 2):
            assert full[i, int(first[i, 1]), int(first[i, 0])]
    np.testing.assert_array_equal(center, instance_points(masks, "center", seed=9, key="other"))
    draws = {tuple(instance_points(masks, "random", seed=s, key="a.png")[2]) for s in range(5)}
    assert len(draws) > 1


def rle(mask: np.ndarray, compressed: bool) -> dict:
    """COCO RLE of ``mask``: compressed (a string) or not (column-major run lengths, background first)."""
    if compressed:
        encoded = mask_utils.encode(np.asfortranarray(mask))
        return {"size": encoded["size"], "counts": encoded["counts"].decode()}
    flat = mask.ravel(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    return {"size": list(mask.shape), "counts": [0] * int(flat[0]) + np.diff(bounds).tolist()}


def make_coco() -> dict:
    """Two 48 x 40 images (no image files): polygons, both RLE forms, a crowd region and two empty masks."""
    ring = np.zeros((40, 48), np.uint8)
    ring[5:30, 20:45] = 1
    ring[12:23, 27:38] = 0
    edge = np.zeros((40, 48), np.uint8)
    edge[30:, :10] = 1
    anns = [
        {"segmentation": [[2, 2, 13, 2, 13, 9, 2, 9]], "category_id": 2},  # 11 x 7 rectangle
        {"segmentation": [[20, 30, 30, 30, 30, 32, 22, 32, 22, 39, 20, 39]], "category_id": 1},  # an L
        {"segmentation": rle(ring, compressed=True), "category_id": 1},
        {"segmentation": [[5.1, 5.1, 5.3, 5.1, 5.3, 5.3]], "category_id": 2},  # too small to cover a pixel centre
        {"segmentation": [[0, 0, 48, 0, 48, 40, 0, 40]], "category_id": 1, "iscrowd": 1},
        {"segmentation": rle(edge, compressed=False), "category_id": 2, "image_id": 2},
        {"segmentation": rle(np.zeros((40, 48), np.uint8), compressed=False), "category_id": 1, "image_id": 2},
    ]
    for i, ann in enumerate(anns):
        ann.update(id=100 + i, bbox=[0, 0, 4, 4], area=16, iscrowd=ann.get("iscrowd", 0),
                   image_id=ann.get("image_id", 1))
    return {"images": [{"id": 1, "file_name": "scenes/a.png", "width": 48, "height": 40},
                       {"id": 2, "file_name": "b.png", "width": 48, "height": 40}],
            "annotations": anns, "categories": [{"id": 2, "name": "plane"}, {"id": 1, "name": "ship"}]}


@pytest.fixture
def coco_file(tmp_path: Path) -> Path:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(make_coco()))
    return path


@pytest.mark.parametrize("rule", ["center", "random"])
def test_one_point_inside_each_non_crowd_instance(coco_file: Path, rule: str) -> None:
    data, report = points_from_coco(coco_file, rule, seed=1)
    assert [p["annotation_id"] for p in data["points"]] == [100, 101, 102, 105]
    assert (report.images, report.annotations, report.points) == (2, 7, 4)
    assert (report.skipped_crowd, report.skipped_empty, report.empty_examples) == (1, 2, [103, 106])
    assert "4 points from 7 annotations" in report.summary() and "103, 106" in report.summary()
    coco = make_coco()
    anns = {a["id"]: a for a in coco["annotations"]}
    for point in data["points"]:
        masks = InstanceMasks.from_coco([anns[point["annotation_id"]]["segmentation"]], 40, 48).to_full()[0]
        assert masks[int(point["y"]), int(point["x"])] == 1
        assert point["category_id"] == anns[point["annotation_id"]]["category_id"]
    assert [c["id"] for c in data["categories"]] == [1, 2]  # sorted by id, as the dataset's labels are
    assert data["info"] == {"source": str(coco_file), "rule": rule, "seed": 1}
    assert data["images"][0] == {"id": 1, "file_name": "scenes/a.png", "width": 48, "height": 40}
    if rule == "center":
        assert (data["points"][0]["x"], data["points"][0]["y"]) == (7.5, 5.5)
        # The 10 x 10 square in the bottom-left corner: its middle, not a pixel on the image edge.
        assert (data["points"][3]["x"], data["points"][3]["y"]) == (4.5, 34.5)


def test_points_are_repeatable(coco_file: Path) -> None:
    center = points_from_coco(coco_file, "center", seed=0)[0]["points"]
    assert center == points_from_coco(coco_file, "center", seed=5)[0]["points"]
    random = points_from_coco(coco_file, "random", seed=2)[0]["points"]
    assert random == points_from_coco(coco_file, "random", seed=2)[0]["points"]
    assert random != points_from_coco(coco_file, "random", seed=3)[0]["points"]


def test_bad_coco_input_names_the_file_and_annotation(coco_file: Path, tmp_path: Path) -> None:
    coco = make_coco()
    coco["annotations"][1]["category_id"] = 7
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"bad\.json: annotation id 101 .*category_id 7"):
        points_from_coco(bad)
    with pytest.raises(ValueError, match="rule"):
        points_from_coco(coco_file, "middle")


def test_points_json_reads_back_by_file_name_and_class(coco_file: Path, tmp_path: Path) -> None:
    data, _ = points_from_coco(coco_file)
    path = write_points_json(data, tmp_path / "out" / "points.json")
    points = read_instance_points(path)
    assert sorted(points) == ["a.png", "b.png"]  # folders dropped
    xy, labels = points["a.png"]
    assert xy.dtype == np.float64 and labels.dtype == np.int64
    assert xy[0].tolist() == [7.5, 5.5]
    assert labels.tolist() == [2, 1, 1]  # ship (id 1) is label 1, plane (id 2) label 2
    _, by_name = read_instance_points(path, class_names=["plane", "ship"])["a.png"]
    assert by_name.tolist() == [1, 2, 2]
    with pytest.raises(DataError, match=r"categories\[1\]: field 'name': 'plane'"):
        read_instance_points(path, class_names=["ship"])


def test_csv_and_geojson_read_back_with_names_and_integer_labels(tmp_path: Path) -> None:
    csv = tmp_path / "points.csv"
    csv.write_text("image,x,y,class\nimg/a.png,12.25,3.5,ship\nb.png,1,2,2\na.png,0,0,plane\n")
    points = read_instance_points(csv, class_names=["plane", "ship"])
    assert points["a.png"][0].tolist() == [[12.25, 3.5], [0.0, 0.0]]
    assert points["a.png"][1].tolist() == [2, 1] and points["b.png"][1].tolist() == [2]
    features = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [4.5, 6.0]},
                 "properties": {"image": "a.png", "class": 1}},
                {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},
                 "properties": {"image": "a.png", "class": "ship"}}]
    geojson = tmp_path / "points.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    xy, labels = read_instance_points(geojson, class_names=["plane", "ship"])["a.png"]
    assert xy.tolist() == [[4.5, 6.0], [1.0, 2.0]] and labels.tolist() == [1, 2]


@pytest.mark.parametrize(("text", "match"), [
    ("image,x,y,class\na.png,abc,1,1\n", r"points\.csv: line 2: field 'x' is not a number"),
    ("image,x,y,class\na.png,1,-2,1\n", r"line 2: field 'y' is negative"),
    ("image,x,y,class\na.png,1,2,0\n", r"line 2: field 'class': class label '0' is not in 1\.\.2"),
    ("image,x,y,class\na.png,1,2,3\n", r"line 2: field 'class': class label '3'"),
    ("image,x,y,class\na.png,1,2,tank\n", r"line 2: field 'class': unknown class 'tank'"),
    ("image,x,y\na.png,1,2\n", r"points\.csv: line 1: the CSV header lacks field\(s\) \['class'\]"),
])
def test_bad_csv_rows_name_the_file_line_and_field(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "points.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        read_instance_points(path, class_names=["plane", "ship"])


def points_json(**point: object) -> dict:
    return {"categories": [{"id": 1, "name": "ship"}], "images": [{"id": 1, "file_name": "a.png", "width": 8,
                                                                   "height": 6}],
            "points": [{"image_id": 1, "category_id": 1, "x": 1.5, "y": 2.5, **point}]}


@pytest.mark.parametrize(("change", "match"), [
    ({"y": None}, r"points\[0\]: field 'y' is missing"),
    ({"x": "left"}, r"points\[0\]: field 'x' is not a number"),
    ({"x": float("nan")}, r"points\[0\]: field 'x' is not a finite number"),
    ({"x": 8.0}, r"points\[0\]: point \(8, 2\.5\) is outside the 8 x 6 image a\.png"),
    ({"image_id": 9}, r"points\[0\]: field 'image_id': 9 names no entry"),
    ({"category_id": 2}, r"points\[0\]: field 'category_id': 2 names no entry"),
])
def test_bad_points_json_names_the_file_point_and_field(tmp_path: Path, change: dict, match: str) -> None:
    path = tmp_path / "pts.json"
    path.write_text(json.dumps(points_json(**change)))
    with pytest.raises(DataError, match=r"pts\.json: " + match):
        read_instance_points(path)


def test_bad_geojson_and_unknown_json_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.geojson"
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": []}, "properties": {}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    with pytest.raises(DataError, match=r"p\.geojson: feature 0: field 'geometry' must be a Point"):
        read_instance_points(path)
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match=r"p\.geojson: expected a points JSON"):
        read_instance_points(path)
    with pytest.raises(DataError, match="not found"):
        read_instance_points(tmp_path / "missing.json")


def test_command_writes_points_and_refuses_to_overwrite(coco_file: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    data_points.add_arguments(parser)
    out = tmp_path / "points.json"
    argv = ["--ann", str(coco_file), "--out", str(out), "--rule", "random", "--seed", "4"]
    assert data_points.run(parser.parse_args(argv)) == 0
    assert "4 points from 7 annotations" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["info"]["rule"] == "random" and len(written["points"]) == 4
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        data_points.run(parser.parse_args(argv))
    assert data_points.run(parser.parse_args(argv + ["--overwrite"])) == 0
    assert json.loads(out.read_text()) == written
    with pytest.raises(ValueError, match="overwrite the input"):
        data_points.run(parser.parse_args(["--ann", str(coco_file), "--out", str(coco_file), "--overwrite"]))
