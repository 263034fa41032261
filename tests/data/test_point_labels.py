"""Point-only training data of the prompted task: points that move with the augmentation, the point-file
dataset's checks, and PointSAM's point-only modes trained from a point file with no masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsiseg.config import ConfigError, DataConfig, config_from_dict
from rsiseg.data.coco_index import DataError
from rsiseg.data.instance_points import points_from_coco, write_points_json
from rsiseg.data.point_labels import PointLabelDataset, PointSet
from rsiseg.data.transforms import build_train_transforms
from rsiseg.masks import InstanceMasks
from tests.tasks.test_prompted_end_to_end import prompted_config


def pixel_centres(masks: InstanceMasks, i: int) -> np.ndarray:
    """The mean (x, y) of the pixel centres of instance ``i``."""
    rows, cols = np.nonzero(masks.to_full()[i].numpy())
    return np.array([cols.mean() + 0.5, rows.mean() + 0.5])


@pytest.mark.parametrize("seed", range(8))
def test_points_move_with_the_pixels_they_mark(seed: int) -> None:
    height, width = 13, 17
    rng = np.random.default_rng(seed)
    pixels = [(int(rng.integers(height)), int(rng.integers(width))) for _ in range(5)]
    full = np.zeros((len(pixels), height, width), dtype=bool)
    for i, (r, c) in enumerate(pixels):
        full[i, r, c] = True
    masks = InstanceMasks.from_masks(full)
    points = PointSet([(c + 0.5, r + 0.5) for r, c in pixels], height, width)
    # An exact integer upscale, flips and quarter turns: every pixel goes to a whole block of pixels.
    transforms = build_train_transforms(DataConfig(max_size=34, hflip=0.5, vflip=0.5, rot90=0.7), 3)
    image = rng.random((height, width, 3), dtype=np.float32)
    moved_image, moved_masks = transforms(image, masks, seed)
    same_image, moved_points = transforms(image, points, seed)
    assert np.array_equal(moved_image, same_image)
    assert (moved_points.height, moved_points.width) == (moved_masks.height, moved_masks.width) == moved_image.shape[:2]
    for i in range(len(pixels)):
        np.testing.assert_allclose(moved_points.xy[i], pixel_centres(moved_masks, i))


def write_images(folder: Path, names: list[str], size: tuple[int, int] = (40, 30)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.full((size[1], size[0], 3), 120, dtype=np.uint8)).save(folder / name)


def test_point_file_dataset_reads_points_and_names_what_is_wrong(tmp_path: Path) -> None:
    write_images(tmp_path / "img", ["a.png", "b.png", "c.png"])
    csv = tmp_path / "points.csv"
    csv.write_text("image,x,y,class\na.png,3.5,4.5,ship\nb.png,10,20,tank\na.png,39.5,0.5,tank\n")
    data = PointLabelDataset(csv, tmp_path / "img", ["ship", "tank"], 2)
    assert len(data) == 2 and "2 training images, 3 points" in data.summary()
    image, target = data[0]
    assert image.shape == (3, 30, 40) and target["image_id"] == 1
    assert torch.equal(target["points"], torch.tensor([[3.5, 4.5], [39.5, 0.5]]))
    assert target["labels"].tolist() == [1, 2] and data.label_to_category == [1, 2]

    csv.write_text("image,x,y,class\nmissing.png,1,1,1\n")
    with pytest.raises(DataError, match=r"points\.csv: image missing\.png not found in .*img"):
        PointLabelDataset(csv, tmp_path / "img", None, 1)
    csv.write_text("image,x,y,class\na.png,1,1,3\n")
    with pytest.raises(DataError, match=r"image a\.png: a point's class label 3 is above model\.num_classes \(2\)"):
        PointLabelDataset(csv, tmp_path / "img", None, 2)
    csv.write_text("image,x,y,class\nc.png,40,1,1\n")
    with pytest.raises(DataError, match=r"image c\.png: point \(40, 1\) lies outside the 40 x 30 px image"):
        PointLabelDataset(csv, tmp_path / "img", None, 1)


def test_a_points_json_names_the_classes_without_a_validation_file(synth_data: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    points, _ = points_from_coco(synth_data["train"])
    write_points_json(points, tmp_path / "points.json")
    categories = json.loads(Path(synth_data["train"]).read_text())["categories"]
    data = PointLabelDataset(tmp_path / "points.json", synth_data["images"], None, len(categories))
    assert data.class_names == [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    assert data.label_to_category == [c["id"] for c in sorted(categories, key=lambda c: c["id"])]
    with pytest.raises(DataError, match=f"{len(categories)} categories but model.num_classes is 9"):
        PointLabelDataset(tmp_path / "points.json", synth_data["images"], None, 9)


def test_point_only_configs_are_checked(synth_data: dict[str, Path], tmp_path: Path) -> None:
    raw = prompted_config(synth_data, tmp_path / "run")
    raw["data"]["train_points"] = "points.json"
    with pytest.raises(ConfigError, match="'data.train_points' and 'data.train_ann' are two training sets"):
        config_from_dict(raw)
    del raw["data"]["train_ann"]
    raw["model"]["sam"]["mode"] = "supervised"
    with pytest.raises(ConfigError, match="'model.sam.mode' = 'supervised' trains on masks"):
        config_from_dict(raw)
    raw["task"] = "instance"
    with pytest.raises(ConfigError, match="'data.train_points' trains the prompted task"):
        config_from_dict(raw)


@pytest.mark.parametrize("mode", ["self_training", "pointsam"])
def test_point_only_modes_train_from_a_point_file(synth_data: dict[str, Path], tmp_path: Path, mode: str) -> None:
    from rsiseg.checkpoint import load_checkpoint
    from rsiseg.engine.trainer import Trainer

    points, report = points_from_coco(synth_data["train"])
    write_points_json(points, tmp_path / "points.json")
    raw = prompted_config(synth_data, tmp_path / "run", max_iters=2)
    raw["data"].pop("train_ann")
    raw["data"]["train_points"] = str(tmp_path / "points.json")
    raw["model"]["sam"]["mode"] = mode
    trainer = Trainer(config_from_dict(raw), progress=False)
    train_set = trainer.train_set
    assert sum(len(train_set[i][1]["points"]) for i in range(len(train_set))) == report.points > 0
    metrics = trainer.fit()
    assert 0.0 <= metrics["prompt"]["mIoU"] <= 1.0  # validation still scores against the masks of val_ann
    state = load_checkpoint(tmp_path / "run" / "last.pth")
    val_categories = json.loads(Path(synth_data["val"]).read_text())["categories"]
    assert state["classes"]["names"] == [c["name"] for c in val_categories] and state["iteration"] == 2
