"""Config: YAML loading, dotted overrides, unknown keys and type checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from rsiseg.config import ConfigError, ExperimentConfig, dump_config, load_config, to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_and_overrides() -> None:
    cfg = load_config(None, ["train.lr=0.01", "model.num_classes=2", "model.anchor_sizes=[[8],[16],[32],[64],[128]]",
                             "train.max_iters=null", "train.weight_decay=1e-3"])
    assert cfg.train.lr == 0.01 and isinstance(cfg.train.lr, float)
    assert cfg.model.num_classes == 2
    assert cfg.model.anchor_sizes[0] == [8]
    assert cfg.train.max_iters is None
    assert cfg.train.weight_decay == pytest.approx(1e-3)


def test_int_is_accepted_for_float() -> None:
    cfg = load_config(None, ["train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("override", ["train.lrr=0.1", "modle.num_classes=2", "train.lr.x=1"])
def test_unknown_override_key_is_named(override: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[0]):
        load_config(None, [override])


def test_unknown_yaml_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_clases: 3\n")
    with pytest.raises(ConfigError, match=r"model\.num_clases"):
        load_config(path)


def test_wrong_type_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(path)


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])


def test_dump_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.lr=0.123", "eval.max_dets=[1, 10, 1000]"])
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["eval"]["max_dets"] == [1, 10, 1000]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), ExperimentConfig)


# (override, the dotted key the error must name): every value a run cannot use is refused at parse time.
BAD_VALUES = [
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=-2", "train.epochs"),
    ("train.max_iters=0", "train.max_iters"),
    ("train.max_iters=-5", "train.max_iters"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.log_interval=0", "train.log_interval"),
    ("train.lr=0", "train.lr"),
    ("train.lr=-0.1", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.grad_clip=.inf", "train.grad_clip"),
    ("train.optimizer=adagrad", "train.optimizer"),
    ("train.scheduler=cosin", "train.scheduler"),
    ("train.plateau_factor=1.0", "train.plateau_factor"),
    ("train.time_budget=0", "train.time_budget"),
    ("train.time_budget=-1", "train.time_budget"),
    ("train.device=gpu", "train.device"),
    ("train.output_dir=''", "train.output_dir"),
    ("model.min_size=0", "model.min_size"),
    ("model.max_size=-1", "model.max_size"),
    ("model.fpn_channels=0", "model.fpn_channels"),
    ("model.in_channels=0", "model.in_channels"),
    ("model.num_classes=0", "model.num_classes"),
    ("model.norm=batchnorm", "model.norm"),
    ("model.pretrained=coco", "model.pretrained"),
    ("model.box_score_thresh=1.5", "model.box_score_thresh"),
    ("model.box_nms_thresh=-0.1", "model.box_nms_thresh"),
    ("model.rpn_nms_thresh=2", "model.rpn_nms_thresh"),
    ("model.rpn_fg_iou=1.2", "model.rpn_fg_iou"),
    ("model.roi_bg_iou=0.9", "model.roi_bg_iou"),  # above roi_fg_iou 0.5
    ("model.roi_positive_fraction=1.5", "model.roi_positive_fraction"),
    ("model.detections_per_img=0", "model.detections_per_img"),
    ("model.anchor_sizes=[[8], []]", "model.anchor_sizes"),
    ("model.image_std=[0.2, 0.0, 0.2]", "model.image_std"),
    ("model.in_channels=4", "model.image_mean"),  # three means for four bands
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.score_threshold=1.5", "eval.score_threshold"),
    ("eval.mask_threshold=-0.5", "eval.mask_threshold"),
    ("eval.preset=dota", "eval.preset"),
    ("eval.iou_types=[bbox, keypoints]", "eval.iou_types"),
    ("eval.iou_types=[]", "eval.iou_types"),
    ("eval.max_dets=[10, 1, 100]", "eval.max_dets"),
    ("data.hflip=1.5", "data.hflip"),
    ("data.vflip=-0.5", "data.vflip"),
    ("data.rot90=2", "data.rot90"),
    ("data.scale_range=[1.2, 0.8]", "data.scale_range"),
    ("data.scale_range=[0, 1]", "data.scale_range"),
    ("data.scale_range=[1.0]", "data.scale_range"),
    ("data.num_workers=-1", "data.num_workers"),
]


@pytest.mark.parametrize(("override", "key"), BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_value_is_refused_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(repr(key))):
        load_config(None, [override])


def test_bad_value_in_a_file_names_the_file_and_every_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 0\n  batch_size: -1\neval:\n  score_threshold: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    for key in ("train.epochs", "train.batch_size", "eval.score_threshold"):
        assert key in str(info.value)


@pytest.mark.parametrize("override", ["data.num_workers=null", "data.num_workers=0", "train.time_budget=null",
                                      "train.time_budget=0.5", "train.max_iters=null", "data.scale_range=[0.8, 1.2]",
                                      "eval.preset=isaid", "train.device=cuda:1", "model.box_score_thresh=0",
                                      "model.in_channels=1", "train.warmup_iters=0", "eval.iou_types=[segm]"])
def test_valid_edge_values_are_accepted(override: str) -> None:
    if override == "model.in_channels=1":  # the bands and their normalisation change together
        load_config(None, [override, "model.image_mean=[0.5]", "model.image_std=[0.2]"])
    else:
        load_config(None, [override])


def test_an_override_may_mend_a_file_value(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 0\n")
    assert load_config(path, ["train.epochs=3"]).train.epochs == 3


def test_known_names_match_the_modules_that_use_them() -> None:
    from rsiseg import config
    from rsiseg.evaluation import coco
    from rsiseg.models.backbones import resnet_fpn

    assert set(config.PRESETS) == set(coco.PRESETS)
    assert set(config.IOU_TYPES) == set(coco.IOU_TYPES)
    assert set(config.NORMS) == set(resnet_fpn.NORMS)
