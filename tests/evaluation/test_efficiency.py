"""Efficiency figures: parameter breakdown (CBAM pulled out, cascade stages, prompt modules), sizes, FLOP counts and
the ``rsiseg info`` body."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from rsiseg.checkpoint import save_checkpoint
from rsiseg.commands import info
from rsiseg.config import ModelConfig, SegConfig, config_from_dict, to_dict
from rsiseg.evaluation.efficiency import (
    MB,
    count_flops,
    flops_by_component,
    measure_efficiency,
    model_size_mb,
    parameter_breakdown,
)
from rsiseg.inference.predictor import without_initial_weights
from rsiseg.models.layers.cbam import CBAM
from rsiseg.models.registry import build_model
from tests.conftest import tiny_config_dict
from tests.models.test_cascade import tiny as tiny_cascade
from tests.models.test_prompt_model import prompt_cfg

RCNN_ROWS = ["backbone", "cbam", "fpn", "rpn", "box head", "box predictor", "mask head"]
PROMPT_ROWS = ["prompt: LPM", "prompt: GPM", "prompt: fusion"]


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tiny_yaml(synth_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("info") / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(synth_data, path.parent / "run")))
    return path


def _info(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    info.add_arguments(parser)
    return info.run(parser.parse_args([str(a) for a in argv]))


def test_mask_rcnn_rows_sum_to_the_total(synth_data, tmp_path):
    raw = tiny_config_dict(synth_data, tmp_path)
    raw["model"]["trainable_layers"] = 3  # conv1 and layer1 frozen: trainable < total in the backbone only
    model = build_model(without_initial_weights(config_from_dict(raw).model))
    rows = parameter_breakdown(model)
    by_name = {row.name: row for row in rows}
    assert [row.name for row in rows] == RCNN_ROWS
    assert sum(row.params for row in rows) == _numel(model)
    assert sum(row.trainable for row in rows) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert by_name["backbone"].params == _numel(model.backbone.body)
    assert by_name["mask head"].params == _numel(model.roi_heads.mask_head) + _numel(model.roi_heads.mask_predictor)
    assert by_name["cbam"].params == 0
    assert by_name["backbone"].trainable < by_name["backbone"].params
    assert all(row.trainable == row.params for row in rows if row.name != "backbone")


def test_cascade_stages_fill_the_box_rows():
    model = build_model(tiny_cascade())
    rows = {row.name: row for row in parameter_breakdown(model)}
    stages = model.roi_heads.stages
    assert list(rows) == RCNN_ROWS  # no "other": every stage's heads are in a row
    assert rows["box head"].params == sum(_numel(stage.box_head) for stage in stages) > 0
    assert rows["box predictor"].params == sum(_numel(stage.box_predictor) for stage in stages) > 0
    assert sum(row.params for row in rows.values()) == _numel(model)


@pytest.mark.parametrize(("lpm", "gpm"), [(True, True), (True, False), (False, True), (False, False)])
def test_prompt_rows_show_each_switch(lpm, gpm):
    model = build_model(prompt_cfg(lpm=lpm, gpm=gpm, fusion="gated"))
    rows = {row.name: row for row in parameter_breakdown(model)}
    assert list(rows) == RCNN_ROWS + PROMPT_ROWS  # shown even when off, so the ablation's tables line up
    assert sum(row.params for row in rows.values()) == _numel(model)
    assert (rows["prompt: LPM"].params > 0) == lpm and (rows["prompt: GPM"].params > 0) == gpm
    assert (rows["prompt: fusion"].params > 0) == (lpm or gpm)
    prompter = model.roi_heads.prompter
    if prompter is not None:
        assert rows["prompt: fusion"].params == _numel(prompter.project) + _numel(prompter.gate)
        assert rows["prompt: LPM"].params + rows["prompt: GPM"].params + rows["prompt: fusion"].params == \
            _numel(prompter)


def test_prompt_flops_include_the_global_tokens_computed_outside_the_gpm():
    torch.manual_seed(0)
    model = build_model(prompt_cfg("cascade_maskrcnn_r18_prompt", fuse="mask_box"))
    report = measure_efficiency(model, in_channels=3, input_size=(128, 128), speed=False)
    rows = {row.name: row for row in report.components}
    assert list(rows) == RCNN_ROWS + PROMPT_ROWS and report.total_params == _numel(model)
    assert sum(row.flops for row in rows.values()) == report.flops
    assert all(rows[name].flops > 0 for name in PROMPT_ROWS)
    flops = count_flops(model, [torch.rand(3, 128, 128)])
    # The global tokens run once per batch from the model's forward, not inside the GPM's forward:
    # charged by call to their own module, they still count to the GPM row.
    global_part = sum(flops.by_module[f"roi_heads.prompter.gpm.{name}"] for name in ("global_tokens", "global_block"))
    inside_forward = flops.by_module["roi_heads.prompter.gpm"]
    gpm = {row.name: row for row in flops_by_component(model, parameter_breakdown(model), flops)}["prompt: GPM"]
    assert global_part > 0 and gpm.flops == inside_forward + global_part
    assert sum(flops.own.values()) == flops.total


class _Stage(nn.Sequential):
    def __init__(self, cin: int, cout: int, attention: bool) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), *([CBAM(cout, reduction=4)] if attention else []))


class _RcnnLike(nn.Module):
    """The attribute paths of a GeneralizedRCNN, CBAM in the body and the FPN, one stray parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = _Stage(3, 8, attention=True)
        self.backbone.fpn = _Stage(8, 8, attention=True)
        self.rpn = nn.Conv2d(8, 3, 1)
        self.roi_heads = nn.Module()
        self.roi_heads.box_head = nn.Linear(8, 4)
        self.roi_heads.box_predictor = nn.Linear(4, 2)
        self.roi_heads.mask_head = nn.Conv2d(8, 8, 3)
        self.roi_heads.mask_predictor = nn.Conv2d(8, 2, 1)
        self.stray = nn.Parameter(torch.zeros(5))


def test_cbam_parameters_anywhere_go_to_the_cbam_row():
    model = _RcnnLike()
    rows = {row.name: row for row in parameter_breakdown(model)}
    cbams = [m for m in model.modules() if isinstance(m, CBAM)]
    assert list(rows) == [*RCNN_ROWS, "other"]
    assert rows["cbam"].params == sum(_numel(m) for m in cbams) > 0
    assert rows["backbone"].params == _numel(model.backbone.body[0])
    assert rows["fpn"].params == _numel(model.backbone.fpn[0])
    assert rows["other"].params == 5
    assert sum(row.params for row in rows.values()) == _numel(model)


class _Toy(nn.Module):
    """No known layout: rows are its children, with the CBAM inside ``features`` pulled out."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _Stage(3, 8, attention=True)
        self.act = nn.ReLU()
        self.classifier = nn.Linear(8, 2)

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        x = self.act(self.features(torch.stack(images)))
        return self.classifier(x.mean(dim=(2, 3)) @ torch.eye(8))  # a matmul in no child: "other" FLOPs


def test_fallback_rows_and_their_flops():
    model = _Toy()
    rows = parameter_breakdown(model)
    assert [row.name for row in rows] == ["features", "classifier", "cbam"]  # act has no parameters: hidden
    assert sum(row.params for row in rows) == _numel(model)
    assert rows[2].params == _numel(model.features[1])
    flops = count_flops(model, [torch.rand(3, 16, 16)])
    with_flops = {row.name: row.flops for row in flops_by_component(model, rows, flops)}
    assert with_flops["features"] == 2 * 3 * 9 * 8 * 16 * 16  # the conv only; its CBAM's FLOPs moved out
    assert with_flops["cbam"] == flops.by_module["features.1"] > 0
    assert with_flops["other"] == 2 * 8 * 8
    assert sum(with_flops.values()) == flops.total


def test_flops_match_a_hand_count():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
    # FlopCounterMode: 2 FLOPs per multiply-add, bias not counted.
    assert count_flops(conv, torch.rand(1, 4, 16, 16)).total == 2 * (4 // 2) * 3 * 3 * 8 * 8 * 8
    linear = nn.Linear(10, 5).train()
    assert count_flops(linear, torch.rand(3, 10)).total == 2 * 3 * 10 * 5
    assert linear.training  # the training mode is restored


def test_sizes_follow_the_bytes_rule():
    model = nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5))
    floats = 10 * 5 + 5 + 5 + 5 + 5 + 5  # weight, bias, BN weight, bias, running mean, running var
    fixed = 8  # num_batches_tracked stays int64 at every precision
    expected = {"fp32": (4 * floats + fixed) / MB, "fp16": (2 * floats + fixed) / MB, "int8": (floats + fixed) / MB}
    assert model_size_mb(model) == pytest.approx(expected)
    assert model_size_mb(model.half()) == pytest.approx(expected)  # the rule, not the current dtype


def test_seg_resnet_gets_a_breakdown():
    cfg = ModelConfig(name="seg_resnet18", num_classes=4, seg=SegConfig(decoder_channels=[32, 16, 16, 8, 8]))
    model = build_model(cfg)
    report = measure_efficiency(model, in_channels=3, input_size=(64, 64), name=cfg.name, speed=False)
    assert [row.name for row in report.components] == ["encoder", "decoder"]
    assert report.total_params == _numel(model)
    assert sum(row.flops for row in report.components) == report.flops > 0
    assert report.detections is None and report.speed is None
    assert "| encoder |" in report.to_markdown()


def test_info_without_speed_writes_json(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert _info(tiny_yaml, "model.detections_per_img=20", "--no-speed", "--json", out) == 0
    printed = capsys.readouterr().out
    assert "| mask head |" in printed and "FPS" not in printed
    report = json.loads(out.read_text())
    assert report["speed"] is None and report["input_size"] == [128, 128]
    assert sum(row["params"] for row in report["components"]) == report["params"]["total"]
    assert sum(row["flops"] for row in report["components"]) == report["flops"]
    assert 0 <= report["detections"] <= 20


def test_info_times_a_one_band_model(synth_data, tmp_path, capsys):
    raw = tiny_config_dict(synth_data, tmp_path / "run")
    # Few proposals and detections: the RoI heads' share of each timed forward stays small.
    raw["model"].update(in_channels=1, image_mean=[0.5], image_std=[0.25], rpn_post_nms_top_n_test=20,
                        detections_per_img=5)
    config = tmp_path / "one_band.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "speed.json"
    assert _info(config, "--fps-runs", 2, "--warmup", 1, "--input-size", 96, 112, "--device", "cpu",
                 "--json", out) == 0
    assert "process peak RSS" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["in_channels"] == 1 and report["input_size"] == [96, 112]
    speed = report["speed"]
    assert speed["runs"] == 2 and len(speed["latency_ms"]) == 2 and speed["fps"] > 0
    assert speed["peak_memory_bytes"] > 0


def test_info_from_a_checkpoint(tiny_yaml, tmp_path, capsys):
    cfg = config_from_dict(yaml.safe_load(tiny_yaml.read_text()))
    model = build_model(without_initial_weights(cfg.model))
    checkpoint = tmp_path / "model.pth"
    save_checkpoint({"model": model.state_dict(), "config": to_dict(cfg)}, checkpoint)
    # The first override lands in the `config` positional when no YAML is named.
    assert _info("--checkpoint", checkpoint, "model.detections_per_img=10", "--no-speed") == 0
    assert f"model from {checkpoint}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="its weights do not fit"):
        _info("--checkpoint", checkpoint, "model.fpn_channels=32", "--no-speed")
    with pytest.raises(ValueError, match="not both"):
        _info(tiny_yaml, "--checkpoint", checkpoint)
    with pytest.raises(ValueError, match="CONFIG.yaml or --checkpoint"):
        _info("--no-speed")


def test_default_input_size():
    cfg = config_from_dict({"model": {"min_size": 256}})
    assert info.default_input_size(cfg) == (256, 256)
    semantic = replace(cfg, task="semantic", data=replace(cfg.data, image_size=150))
    assert info.default_input_size(semantic) == (150, 150)


def test_command_module_imports_no_torch():
    code = "import sys, rsiseg.commands.info; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
