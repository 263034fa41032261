"""Config: YAML loading, dotted overrides, unknown keys and type checks."""

from __future__ import annotations

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
