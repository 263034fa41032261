"""Training-set filters: crowded images out, a share of the empty images kept, counted, the same on every run."""

from __future__ import annotations

from pathlib import Path

import pytest

from rsiseg.config import config_from_dict
from rsiseg.data.coco_index import CocoIndex, DataReport
from rsiseg.data.filters import draw_kept_share, filter_training_images
from rsiseg.tasks import get_task
from tests.conftest import tiny_config_dict


def index_with(instance_counts: list[int]) -> CocoIndex:
    images = [{"id": i + 1, "file_name": f"{i}.png", "width": 10, "height": 10} for i in range(len(instance_counts))]
    anns = {i + 1: [{"id": 100 * i + k, "image_id": i + 1, "iscrowd": 0} for k in range(n)]
            for i, n in enumerate(instance_counts)}
    anns[1] = anns[1] + [{"id": 99, "image_id": 1, "iscrowd": 1}] * 5  # crowd regions are not instances
    return CocoIndex(Path("a.json"), Path("."), images, anns, [], DataReport("a.json"))


def test_crowded_images_out_and_a_share_of_empty_ones_kept() -> None:
    counts = [3, 0, 500, 0, 0, 0, 0, 0, 0, 0, 0, 0, 401, 400]  # 10 empty images
    index = index_with(counts)
    line = filter_training_images(index, max_instances=400, max_empty_fraction=0.3, seed=0)
    kept = {image["id"] for image in index.images}
    assert {1, 14} <= kept and not {3, 13} & kept  # 500 and 401 instances are over the limit; 400 is not
    assert sum(counts[i - 1] == 0 for i in kept) == 3  # floor(0.3 * 10)
    assert "kept 5 of 14 images (2 with more than 400 instances left out, 7 empty images left out)" in line
    again = index_with(counts)
    filter_training_images(again, max_instances=400, max_empty_fraction=0.3, seed=0)
    assert [image["id"] for image in again.images] == [image["id"] for image in index.images]


def test_the_draw_is_the_one_data_split_makes() -> None:
    assert len(draw_kept_share(list(range(10)), 0.35, seed=1)) == 3
    assert draw_kept_share(list(range(10)), 0.5, seed=1) == draw_kept_share(list(range(10)), 0.5, seed=1)


def test_filters_that_leave_nothing_are_refused() -> None:
    with pytest.raises(ValueError, match="leave no training image"):
        filter_training_images(index_with([0, 0]), max_instances=None, max_empty_fraction=0.0)


def test_task_applies_the_filters_to_training_only(synth_data: dict[str, Path], tmp_path: Path) -> None:
    raw = tiny_config_dict(synth_data, tmp_path / "run")
    train, _ = get_task("instance").build_datasets(config_from_dict(raw))
    counts = sorted(len(train.index.anns_by_image[img["id"]]) for img in train.index.images)
    limit = counts[len(counts) // 2]
    raw["data"].update(max_instances=limit)
    train, val = get_task("instance").build_datasets(config_from_dict(raw))
    assert len(train) == sum(c <= limit for c in counts) < len(counts)
    assert len(val) == 2  # evaluation data is never filtered
