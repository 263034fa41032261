"""`rsiseg anchors`: recall on the RPN's anchor grid, the model's resize, k-means, the search, the command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from rsiseg.commands import anchors as anchors_command
from rsiseg.config import config_from_dict
from rsiseg.data.coco_index import DataError, DataReport
from rsiseg.models.backbones.resnet_fpn import build_resnet_fpn
from rsiseg.tools.anchor_boxes import BoxSet, ResizeRule, load_boxes
from rsiseg.tools.anchor_recall import (
    AnchorConfig,
    anchor_recall,
    best_anchor_iou,
    dense_best_anchor_iou,
    feature_grid,
    rpn_positive_share,
)
from rsiseg.tools.anchor_search import (
    SearchSpace,
    kmeans_anchor_config,
    kmeans_iou,
    objective_value,
    search_anchors,
    size_bounds,
)
from rsiseg.tools.anchors import STRIDE_ADJUSTED, TORCHVISION_DEFAULT
from tests.conftest import tiny_config_dict


def _box_set(boxes: list[list[float]], shapes: list[tuple[int, int]], index: list[int]) -> BoxSet:
    resized = torch.tensor(shapes, dtype=torch.int64)
    padded = torch.tensor([ResizeRule.padded_shape(h, w) for h, w in shapes], dtype=torch.int64)
    return BoxSet(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4), torch.tensor(index), resized, padded,
                  [f"image{i}" for i in range(len(shapes))], DataReport("test"))


def _random_box_set(seed: int, shapes: list[tuple[int, int]], per_image: int = 60) -> BoxSet:
    rng = np.random.default_rng(seed)
    boxes, index = [], []
    for i, (h, w) in enumerate(shapes):
        wh = np.exp(rng.uniform(np.log(3), np.log(300), size=(per_image, 2)))
        xy = rng.uniform(0, 1, size=(per_image, 2)) * np.array([w, h])
        b = np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1)
        b = b[(b[:, 2] - b[:, 0] > 1) & (b[:, 3] - b[:, 1] > 1)]
        boxes += b.tolist()
        index += [i] * len(b)
    return _box_set(boxes, shapes, index)


def test_recall_against_a_hand_computed_grid() -> None:
    # One 64 px image: P2 is 16 x 16 cells of stride 4, anchors 16 x 16 centred at (4j, 4i).
    boxes = [[0, 0, 16, 16],  # centre (8, 8) is a grid centre: IoU 1
             [10, 10, 26, 26],  # centre (18, 18) falls between 16 and 20: anchor [8, 8, 24, 24], 14^2 / 316
             [30, 30, 38, 38],  # 8 x 8 inside the anchor [24, 24, 40, 40]: 64 / 256
             [40, 4, 60, 12]]  # 20 x 8, centre x 50 between 48 and 52: 16 * 8 / (256 + 160 - 128)
    box_set = _box_set(boxes, [(64, 64)], [0] * 4)
    config = AnchorConfig("one level", [[16]], [[1.0]])
    expected = torch.tensor([1.0, 196 / 316, 64 / 256, 128 / 288], dtype=torch.float64)
    best, level = best_anchor_iou(box_set, config)
    torch.testing.assert_close(best, expected)
    assert level.tolist() == [0, 0, 0, 0]
    rows, dense = dense_best_anchor_iou(box_set, config, [0])
    torch.testing.assert_close(dense.double(), expected[rows], atol=1e-6, rtol=0)
    row = anchor_recall(box_set, config)
    assert (row["recall@0.5"], row["recall@0.7"], row["recall@0.75"]) == (0.5, 0.25, 0.25)
    assert row["recall@0.5_small"] == 0.5 and row["recall@0.5_medium"] is None
    assert row["mean_best_iou"] == pytest.approx(float(expected.mean()))


def test_rpn_positive_share_counts_competing_boxes() -> None:
    # Two identical boxes on a grid anchor: the matcher gives every anchor to one of them only.
    box_set = _box_set([[0, 0, 16, 16], [0, 0, 16, 16], [40, 40, 56, 56]], [(64, 64)], [0] * 3)
    config = AnchorConfig("one level", [[16]], [[1.0]])
    assert anchor_recall(box_set, config)["recall@0.7"] == 1.0
    assert rpn_positive_share(box_set, config, [0]) == pytest.approx(2 / 3)


def test_ratio_is_height_over_width() -> None:
    # Size 8, ratio 4: torchvision makes it 8 / sqrt(4) = 4 wide and 8 * sqrt(4) = 16 tall.
    box_set = _box_set([[30, 24, 34, 40]], [(64, 64)], [0])  # 4 x 16, centred on the grid point (32, 32)
    assert best_anchor_iou(box_set, AnchorConfig("tall", [[8]], [[4.0]]))[0].item() == 1.0
    assert best_anchor_iou(box_set, AnchorConfig("wide", [[8]], [[0.25]]))[0].item() == pytest.approx(16 / 112)


@pytest.mark.parametrize("config", [TORCHVISION_DEFAULT, STRIDE_ADJUSTED,
                                    AnchorConfig("odd", [[7, 13], [19, 23], [41, 50], [77, 99], [150, 301]],
                                                 [[0.3, 1.7, 3.1]])], ids=lambda c: c.name)
def test_exact_best_iou_equals_torchvision_dense_grid(config: AnchorConfig) -> None:
    # 333 x 517 pads to 352 x 544 and 800 x 800 gives P6 13 cells of stride 61: both grids as torchvision makes them.
    box_set = _random_box_set(0, [(333, 517), (800, 800), (97, 131)])
    best, _ = best_anchor_iou(box_set, config)
    rows, dense = dense_best_anchor_iou(box_set, config, range(3))
    assert len(rows) == len(box_set)
    torch.testing.assert_close(best[rows], dense.double(), atol=1e-5, rtol=0)


def test_feature_grid_matches_the_backbone() -> None:
    backbone = build_resnet_fpn("resnet18", fpn_channels=8).eval()
    with torch.no_grad():
        features = backbone(torch.zeros(1, 3, 96, 160))
    assert [tuple(f.shape[-2:]) for f in features.values()] == feature_grid(96, 160)


@pytest.mark.parametrize(("min_size", "max_size"), [(352, 576), (800, 1333)])
def test_boxes_are_resized_as_the_model_resizes(tmp_path: Path, min_size: int, max_size: int) -> None:
    shapes = [(500, 375), (300, 900), (100, 100), (517, 333)]
    images = [{"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w} for i, (h, w) in enumerate(shapes)]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10.5, 20.0, 40.0, 30.25], "iscrowd": 0}
            for i in range(len(shapes))]
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    box_set = load_boxes([path], ResizeRule(min_size, max_size))
    transform = GeneralizedRCNNTransform(min_size, max_size, [0.5] * 3, [0.25] * 3).eval()
    for i, (h, w) in enumerate(shapes):
        target = {"boxes": torch.tensor([[10.5, 20.0, 50.5, 50.25]])}
        image, target = transform.resize(torch.zeros(3, h, w), target)
        assert tuple(box_set.resized[i].tolist()) == tuple(image.shape[-2:])
        batched = transform.batch_images([image])
        assert tuple(box_set.padded[i].tolist()) == tuple(batched.shape[-2:])
        torch.testing.assert_close(box_set.boxes[i].float(), target["boxes"][0], atol=1e-4, rtol=0)


def test_crowd_and_degenerate_boxes_are_skipped_and_counted(tmp_path: Path) -> None:
    anns = [{"id": 1, "image_id": 1, "bbox": [0, 0, 10, 10]},
            {"id": 2, "image_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 1},
            {"id": 3, "image_id": 1, "bbox": [5, 5, 0, 4]}, {"id": 4, "image_id": 9, "bbox": [0, 0, 5, 5]},
            {"id": 5, "image_id": 1, "bbox": [90, 90, 20, 20]}, {"id": 6, "image_id": 1, "bbox": "none"}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 100, "width": 100}],
                                "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    box_set = load_boxes([path], ResizeRule(100, 100))
    assert len(box_set) == 2
    torch.testing.assert_close(box_set.boxes[1], torch.tensor([90.0, 90.0, 100.0, 100.0], dtype=torch.float64))
    assert dict(box_set.report.counts) == {"crowd box": 1, "zero-area box": 1, "unknown image id": 1,
                                           "box clipped to image": 1, "missing or malformed bbox": 1}


def test_kmeans_is_deterministic_and_shaped() -> None:
    box_set = _random_box_set(1, [(800, 800)] * 4)
    wh = (box_set.boxes[:, 2:] - box_set.boxes[:, :2]).numpy()
    centroids, counts = kmeans_iou(wh, 9, seed=3)
    again, _ = kmeans_iou(wh, 9, seed=3)
    assert centroids.shape == (9, 2) and np.array_equal(centroids, again)
    assert counts.sum() == len(wh) and np.all(np.diff(centroids[:, 0] * centroids[:, 1]) >= 0)
    space = SearchSpace(sizes_per_level=2, num_ratios=3)
    config, clusters = kmeans_anchor_config(box_set, space, n_clusters=9, seed=3)
    assert config.per_location == 6 and len(config.sizes) == 5 and len(clusters["levels"]) == 9
    assert all(size_bounds(lv)[0] <= sizes[0] <= size_bounds(lv)[1] for lv, sizes in enumerate(config.sizes))
    assert space.params_of(config) is not None  # the search can start from it exactly
    assert kmeans_anchor_config(box_set, space, n_clusters=9, seed=3)[0] == config


def test_search_is_at_least_as_good_as_its_kmeans_start() -> None:
    box_set = _random_box_set(2, [(800, 800)] * 3)
    space = SearchSpace()
    kmeans, _ = kmeans_anchor_config(box_set, space)
    result = search_anchors(box_set, space, trials=6, seed=0, start=[kmeans, STRIDE_ADJUSTED], progress=False)
    assert result.enqueued == ["k-means"]  # 6 anchors per location do not fit a 1 x 3 space
    assert len(result.trials) == 6 and result.best.per_location == 3
    assert result.best_value >= objective_value(box_set, kmeans, "recall@0.7")
    assert result.best_value == objective_value(box_set, result.best, "recall@0.7")
    per_level = SearchSpace(sizes_per_level=2, per_level_ratios=True)
    result = search_anchors(box_set, per_level, trials=3, objective="mean_best_iou", start=[STRIDE_ADJUSTED],
                            progress=False)
    assert result.enqueued == ["iSAID stride-adjusted"] and len(result.best.ratios) == 5
    assert result.best_value >= objective_value(box_set, STRIDE_ADJUSTED, "mean_best_iou")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    anchors_command.add_arguments(parser)
    return parser.parse_args(argv)


def test_command_end_to_end_on_synthetic_data(synth_data: dict[str, Path], tmp_path: Path) -> None:
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(json.loads(json.dumps(tiny_config_dict(synth_data, tmp_path), default=str))))
    out = tmp_path / "anchors"
    args = _parse(["--data", str(synth_data["train"]), str(synth_data["val"]), "--config", str(config_path),
                   "--out", str(out), "--trials", "4", "--seed", "1"])
    assert anchors_command.run(args) == 0
    report = json.loads((out / "anchors.json").read_text())
    names = [row["name"] for row in report["configs"]]
    assert names == ["current (tiny.yaml)", "torchvision default", "iSAID stride-adjusted", "k-means", "optuna best"]
    assert report["resize"]["min_size"] == 128 and report["box_statistics"]["images"] == 8
    assert report["verification"]["max_abs_iou_difference"] < 1e-5
    assert "| optuna best | 3 |" in (out / "anchors.md").read_text()
    snippet = yaml.safe_load((out / "best_anchors.yaml").read_text())
    model = config_from_dict({"model": snippet["model"]}).model  # pastes into a config as it is
    assert model.anchor_sizes == report["best_anchors"]["anchor_sizes"]


def test_bad_data_path_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    with pytest.raises(ValueError, match="nowhere.json"):
        anchors_command.run(_parse(["--data", str(missing), "--out", str(tmp_path / "o"), "--trials", "1"]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 0, "width": 5}],
                               "annotations": [], "categories": []}))
    with pytest.raises(DataError, match="bad.json: images\\[0\\] field 'height'"):
        load_boxes([bad], ResizeRule())
    with pytest.raises(ValueError, match="--trials"):
        anchors_command.run(_parse(["--data", str(bad), "--out", str(tmp_path / "o"), "--trials", "0"]))


def test_ssdd_train_split(shared_data: Path, tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[2] / "configs" / "ssdd_cpu.yaml"
    args = _parse(["--data", str(shared_data / "ssdd" / "annotations" / "ssdd_instances_train.json"),
                   "--config", str(config), "--out", str(tmp_path), "--trials", "3", "--max-images", "100",
                   "--rpn-images", "20", "--verify-images", "2"])
    assert anchors_command.run(args) == 0
    report = json.loads((tmp_path / "anchors.json").read_text())
    assert report["box_statistics"]["images"] == 928 and report["box_statistics"]["boxes"] == 2040
    assert report["box_statistics"]["resized_short_side"]["max"] == 352  # configs/ssdd_cpu.yaml's min_size
    assert report["verification"]["max_abs_iou_difference"] < 1e-5
    assert report["configs"][0]["anchor_sizes"] == [[8], [16], [32], [64], [128]]
