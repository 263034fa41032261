"""Grad-CAM per detected instance (:mod:`rsiseg.tools.gradcam`) and the ``rsiseg explain`` command.

The checkpoint is an untrained tiny Mask R-CNN: its scores are low, so the tests lower the score
threshold to 0 and any detection counts. The Grad-CAM formula itself is checked on a hand-built
R-CNN whose class logit reads one channel of the feature map, so the expected map is known exactly.
Cascade and prompt models are built untrained from the tiny model configs of their own tests.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign

from rsiseg.checkpoint import save_checkpoint
from rsiseg.commands import explain
from rsiseg.config import config_from_dict, to_dict
from rsiseg.inference.predictor import LoadedModel, load_model, predict_images
from rsiseg.models.layers.box_prompting import prompt_context
from rsiseg.models.registry import build_model
from rsiseg.tools.gradcam import box_class_logits, grad_cam, instance_cams, layer_names
from tests.models.test_cascade import tiny as tiny_cascade
from tests.models.test_prompt_model import prompt_cfg

Explained = tuple[dict[str, torch.Tensor], torch.Tensor]  # instance_cams: (detections, cams)


@pytest.fixture(scope="module")
def checkpoint(untrained_checkpoint: str) -> str:
    return untrained_checkpoint


@pytest.fixture(scope="module")
def loaded(checkpoint: str) -> LoadedModel:
    return load_model(checkpoint, "cpu")


@pytest.fixture(scope="module")
def image(synth_data: dict[str, Path]) -> torch.Tensor:
    """The first synthetic image, float [3, 128, 128] in [0, 1]."""
    path = sorted(Path(synth_data["images"]).glob("*.png"))[0]
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


@pytest.fixture(scope="module")
def auto_cams(loaded: LoadedModel, image: torch.Tensor) -> Explained:
    """The 4 best detections (score threshold 0) explained at the default layer ``fpn``."""
    return instance_cams(loaded.model, image, "fpn", score_threshold=0.0, max_instances=4)


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    explain.add_arguments(parser)
    return explain.run(parser.parse_args(list(argv)))


def test_layer_names_come_from_the_model(loaded: LoadedModel) -> None:
    names = layer_names(loaded.model)
    assert names[:5] == ["fpn", "fpn:0", "fpn:1", "fpn:2", "fpn:3"]  # the levels the box pooler reads: no P6
    stages = [f"backbone.body.layer{i}" for i in range(1, 5)]
    assert set(stages) <= set(names) and names.index(stages[0]) < names.index(stages[3])
    assert not any(n.startswith("backbone.body.layer1.") for n in names)  # outermost modules only
    assert loaded.model.training is False


def test_one_map_per_detection_in_unit_range(loaded: LoadedModel, image: torch.Tensor, auto_cams: Explained) -> None:
    model = loaded.model
    flags = [p.requires_grad for p in model.parameters()]
    expected = predict_images(model, [image], loaded.device)[0]
    for layer in ("fpn", "backbone.body.layer3", "backbone.body.bn1"):  # an in-place ReLU follows bn1
        dets, cams = auto_cams if layer == "fpn" else instance_cams(model, image, layer, score_threshold=0.0,
                                                                      max_instances=4)
        n = len(dets["labels"])
        assert n == 4 and cams.shape == (n, 128, 128) and cams.dtype == torch.float32
        assert all(len(dets[key]) == n for key in ("boxes", "scores", "logits", "peaks"))
        assert cams.min() >= 0 and cams.max() <= 1
        assert torch.equal(dets["boxes"], expected["boxes"][:4]) and torch.equal(dets["labels"], expected["labels"][:4])
        for cam, peak in zip(cams, dets["peaks"]):  # normalised per instance, blank maps stay zero
            assert (cam.max() == 1) if peak > 0 else (cam.max() == 0)
        assert (dets["peaks"] > 0).any()
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training

    # A non-square image: the padding of the batch is cropped away, the map has the image's size.
    dets, cams = instance_cams(model, image[:, :100], "fpn", score_threshold=0.0, max_instances=3)
    assert cams.shape == (len(dets["labels"]), 100, 128) and len(dets["labels"]) > 0


def test_a_box_is_explained_at_the_fpn_level_it_is_pooled_from(loaded: LoadedModel, image: torch.Tensor,
                                                               auto_cams: Explained) -> None:
    # Boxes under 112 px (sqrt of the area) are pooled from P2 = fpn:0; P5 = fpn:3 takes 448 px and more.
    auto_dets, auto = auto_cams
    _, level0 = instance_cams(loaded.model, image, "fpn:0", score_threshold=0.0, max_instances=4)
    level3_dets, level3 = instance_cams(loaded.model, image, "fpn:3", score_threshold=0.0, max_instances=4)
    sides = (auto_dets["boxes"][:, 2:] - auto_dets["boxes"][:, :2]).prod(dim=1).sqrt()
    assert (sides < 112).all()
    torch.testing.assert_close(auto, level0)
    assert (level3_dets["peaks"] == 0).all() and (level3 == 0).all()


@pytest.mark.parametrize("name", ["cascade_maskrcnn_r18_fpn", "maskrcnn_r18_prompt", "cascade_maskrcnn_r18_prompt"])
def test_cascade_and_prompt_models_get_one_map_per_detection(name: str, image: torch.Tensor) -> None:
    torch.manual_seed(0)
    cfg = tiny_cascade() if name == "cascade_maskrcnn_r18_fpn" else prompt_cfg(name, fuse="mask_box")
    model = build_model(replace(cfg, box_score_thresh=0.0)).eval()
    assert layer_names(model)[:2] == ["fpn", "fpn:0"]
    for layer in ("fpn", "backbone.body.layer3"):
        dets, cams = instance_cams(model, image, layer, score_threshold=0.0, max_instances=4)
        n = len(dets["labels"])
        assert n == 4 and cams.shape == (n, 128, 128) and cams.dtype == torch.float32
        assert all(len(dets[key]) == n for key in ("boxes", "scores", "logits", "peaks"))
        assert torch.isfinite(dets["logits"]).all() and cams.min() >= 0 and cams.max() <= 1
        assert (dets["peaks"] > 0).any() and (cams.flatten(1).amax(dim=1) > 0).any()
        for cam, peak in zip(cams, dets["peaks"]):
            assert (cam.max() == 1) if peak > 0 else (cam.max() == 0)


def _network_input(model: nn.Module, image: torch.Tensor, boxes: torch.Tensor):
    """The transformed batch, its FPN features and ``boxes`` scaled into it."""
    batch, _ = model.transform([image])
    rois = resize_boxes(boxes, tuple(image.shape[-2:]), tuple(batch.image_sizes[0]))
    return batch, model.backbone(batch.tensors), [rois]


@torch.no_grad()
def test_prompt_models_explain_the_prompted_logit(image: torch.Tensor) -> None:
    # The prompts enter the box head (fuse: mask_box), so they change the logit that is explained.
    torch.manual_seed(0)
    model = build_model(prompt_cfg(fuse="mask_box")).eval()
    given = {"boxes": torch.tensor([[10.0, 20.0, 60.0, 50.0], [70.0, 5.0, 120.0, 100.0]]),
             "labels": torch.tensor([1, 3])}
    with torch.enable_grad():
        dets, cams = instance_cams(model, image, "fpn", detections=given)
    assert cams.shape == (2, 128, 128) and (dets["peaks"] > 0).all()
    batch, features, rois = _network_input(model, image, given["boxes"])
    context = prompt_context(model, [image], batch)
    heads = model.roi_heads
    logits = box_class_logits(heads, features, rois, batch.image_sizes, context)
    torch.testing.assert_close(logits.softmax(-1), heads.box_class_probs(features, rois, batch.image_sizes, context))
    torch.testing.assert_close(dets["logits"], logits[torch.arange(2), given["labels"]])
    unprompted = box_class_logits(heads, features, rois, batch.image_sizes, None)
    assert not torch.allclose(logits, unprompted)


@torch.no_grad()
def test_cascade_logit_is_the_mean_of_the_stage_logits(image: torch.Tensor) -> None:
    # With one stage, the cascade's score is that stage's softmax: its logits are the stage's own.
    torch.manual_seed(0)
    cfg = tiny_cascade()
    one_stage = replace(cfg.cascade, stage_ious=[0.5], stage_box_weights=[[10.0, 10.0, 5.0, 5.0]],
                        stage_loss_weights=[1.0])
    boxes = torch.tensor([[10.0, 20.0, 60.0, 50.0], [70.0, 5.0, 120.0, 100.0]])
    for cascade in (one_stage, cfg.cascade):
        model = build_model(replace(cfg, cascade=cascade)).eval()
        batch, features, rois = _network_input(model, image, boxes)
        heads = model.roi_heads
        logits = box_class_logits(heads, features, rois, batch.image_sizes)
        stage_logits = []
        for index, stage in enumerate(heads.stages):
            class_logits, deltas = stage.box_predictor(heads.box_features(features, rois, batch.image_sizes,
                                                                          stage=index))
            stage_logits.append(class_logits)
            rois = heads.refine_boxes(stage, deltas, rois, batch.image_sizes)
        torch.testing.assert_close(logits, torch.stack(stage_logits).mean(0))
        if len(heads.stages) == 1:
            probs = heads.box_class_probs(features, _network_input(model, image, boxes)[2], batch.image_sizes)
            torch.testing.assert_close(logits.softmax(-1), probs)


def test_grad_cam_is_the_relu_of_the_gradient_weighted_channel_sum() -> None:
    activation, gradient = torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5)
    weights = gradient[0].mean(dim=(1, 2))
    expected = sum(weights[c] * activation[0, c] for c in range(3)).clamp(min=0)
    torch.testing.assert_close(grad_cam(activation, gradient), expected)


class _IdentityBackbone(nn.Module):
    """One FPN-like level "0" at stride 1: a 1x1 identity convolution of the image; and a side
    branch that runs but feeds nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.ModuleDict({"conv": nn.Conv2d(2, 2, 1, bias=False), "side": nn.Conv2d(2, 4, 3, padding=1)})
        with torch.no_grad():
            self.body["conv"].weight.copy_(torch.eye(2)[:, :, None, None])
        self.out_channels = 2

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        self.body["side"](x)
        return OrderedDict([("0", self.body["conv"](x))])


class _ChannelZeroLogit(nn.Module):
    """A box predictor whose class-1 logit is ``sign`` times the pooled channel 0 (channel 1 is ignored)."""

    def __init__(self, sign: float) -> None:
        super().__init__()
        self.sign = sign

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([torch.zeros_like(x[:, 0]), self.sign * x[:, 0]], dim=1), x.new_zeros(len(x), 8)


def _hand_built(input_size: int, sign: float = 1.0) -> nn.Module:
    """An R-CNN shell: transform (resize to ``input_size``, no normalisation), backbone, box RoI head."""
    model = nn.Module()
    model.transform = GeneralizedRCNNTransform(input_size, input_size, [0.0, 0.0], [1.0, 1.0])
    model.backbone = _IdentityBackbone()
    model.roi_heads = nn.Module()
    model.roi_heads.box_roi_pool = MultiScaleRoIAlign(["0"], output_size=1, sampling_ratio=2)
    model.roi_heads.box_head = nn.Flatten()
    model.roi_heads.box_predictor = _ChannelZeroLogit(sign)
    return model.eval()


def test_hand_built_model_gives_the_known_map() -> None:
    # The logit is a non-negative average of channel 0 inside the box, so d logit / dA is >= 0 on
    # channel 0 and 0 on channel 1: w = (w0 > 0, 0) and the map is A_0 / max(A_0) exactly, zero
    # wherever channel 0 is zero, however bright channel 1 is.
    torch.manual_seed(0)
    image = torch.zeros(2, 32, 32)
    image[0, 8:24, 4:20] = torch.linspace(0.1, 1.0, 16)  # a ramp in x inside a square
    image[1] = torch.rand(32, 32)
    box = {"boxes": torch.tensor([[4.0, 8.0, 20.0, 24.0]]), "labels": torch.tensor([1])}
    expected = image[0] / image[0].max()
    model = _hand_built(32)
    assert layer_names(model) == ["fpn", "fpn:0", "backbone.body.conv"]  # not the side branch: it feeds nothing
    for layer in ("fpn", "fpn:0", "backbone.body.conv"):
        dets, cams = instance_cams(model, image, layer, detections=box)
        assert dets["logits"][0] > 0 and dets["peaks"][0] > 0
        torch.testing.assert_close(cams[0], expected)

    # A logit that falls as channel 0 rises: every weight is negative, the ReLU leaves nothing.
    dets, cams = instance_cams(_hand_built(32, sign=-1.0), image, "fpn", detections=box)
    assert dets["peaks"][0] == 0 and (cams == 0).all()
    # A module that feeds no score has no gradient: a blank map, not an error.
    dets, cams = instance_cams(model, image, "backbone.body.side", detections=box)
    assert dets["peaks"][0] == 0 and (cams == 0).all()
    with pytest.raises(ValueError, match="did not run"):  # the ModuleDict itself is never called
        instance_cams(model, image, "backbone.body", detections=box)


def test_boxes_are_scaled_into_the_transformed_image() -> None:
    # The transform doubles the image: the box must be pooled at twice its input coordinates. The
    # square of ones is [16, 32) in the input, [32, 64) in the transformed image, so the unscaled box
    # would read zeros (logit 0), the scaled one ones (logit 1).
    image = torch.zeros(2, 32, 32)
    image[0, 16:, 16:] = 1.0
    box = {"boxes": torch.tensor([[16.0, 16.0, 32.0, 32.0]]), "labels": torch.tensor([1])}
    dets, cams = instance_cams(_hand_built(64), image, "fpn", detections=box)
    torch.testing.assert_close(dets["logits"], torch.tensor([1.0]))
    assert cams.shape == (1, 32, 32) and (cams[0, :12, :12] == 0).all() and cams[0, 20:, 20:].min() > 0.9


def test_explain_writes_overlays_grid_and_json(checkpoint: str, synth_data: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    sources = [Path(shutil.copy(p, folder)) for p in sorted(Path(synth_data["images"]).glob("*.png"))[:2]]
    out = tmp_path / "out"
    assert _run(str(folder), "--checkpoint", checkpoint, "--out", str(out), "--score-threshold", "0",
                "--max-instances", "3", "--device", "cpu") == 0
    report = json.loads((out / "explain.json").read_text())
    assert report["layer"] == "fpn" and [e["file_name"] for e in report["images"]] == [str(p) for p in sources]
    for entry, source in zip(report["images"], sources):
        assert entry["layer"] == "fpn" and len(entry["instances"]) == 3
        assert entry["grid"] == f"explain/{source.stem}_grid.png" and (out / entry["grid"]).is_file()
        for k, inst in enumerate(entry["instances"]):
            assert inst["file"] == f"explain/{source.stem}_{k}_{inst['class_name']}.png"
            assert set(inst) >= {"box", "label", "class_name", "score", "logit"} and len(inst["box"]) == 4
            overlay = Image.open(out / inst["file"])
            assert overlay.size == (128, 128) and overlay.mode == "RGB"
    assert sorted(p.name for p in out.iterdir()) == ["explain", "explain.json"]
    assert len(list((out / "explain").iterdir())) == 2 * 4
    assert "explained 6 instances in 2 images" in capsys.readouterr().out

    with pytest.raises(FileExistsError, match="--overwrite"):
        _run(str(folder), "--checkpoint", checkpoint, "--out", str(out))
    assert _run("--checkpoint", checkpoint, "--list-layers") == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["fpn", "fpn:0"]


def test_unknown_layers_and_models_without_roi_heads_are_refused(checkpoint: str, synth_data: dict[str, Path],
                                                                 loaded: LoadedModel, image: torch.Tensor,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"unknown layer 'layer9'; valid layers: fpn, fpn:0, .*backbone.body.layer4"):
        _run(str(synth_data["images"]), "--checkpoint", checkpoint, "--out", str(out), "--layer", "layer9")
    assert not out.exists()  # refused before anything was written
    with pytest.raises(ValueError, match="--out is required"):
        _run(str(synth_data["images"]), "--checkpoint", checkpoint)
    with pytest.raises(ValueError, match="runs more than once"):  # a BasicBlock's ReLU runs twice
        instance_cams(loaded.model, image, "backbone.body.layer1.0.relu", score_threshold=0.0)

    semantic = config_from_dict({"task": "semantic", "data": {"train_images": "x", "train_labels": "y"},
                                 "model": {"name": "seg_resnet18", "num_classes": 3}})
    model = build_model(semantic.model)
    with pytest.raises(ValueError, match="has no RoI heads"):
        instance_cams(model, image, "fpn")
    save_checkpoint({"model": model.state_dict(), "config": to_dict(semantic)}, tmp_path / "semantic.pth")
    with pytest.raises(ValueError, match="SegResNet has no RoI heads"):
        _run("--checkpoint", str(tmp_path / "semantic.pth"), "--list-layers")
