"""The fast eval path: batch norms folded into their convolutions give the same outputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from rsiseg.inference.fast import FastOptions, fold_batchnorm, prepare_for_inference
from rsiseg.models.registry import build_model
from tests.models.test_mask_rcnn import tiny


def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Give every batch norm non-trivial statistics, as a trained model has."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def tiny_with_reference(**cfg: object) -> tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    """A seeded tiny eval-mode model (every detection kept), a random 128 px image and the model's output on it."""
    torch.manual_seed(0)
    model = build_model(tiny(box_score_thresh=0.0, **cfg)).eval()
    image = torch.rand(3, 128, 128)
    with torch.no_grad():
        return model, image, model([image])[0]


@pytest.mark.parametrize("norm", ["bn", "frozen_bn"])
def test_folded_model_gives_the_same_outputs(norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(norm=norm, box_score_thresh=0.0)).eval()
    randomise_norms(model)
    image = torch.rand(3, 128, 128)
    with torch.no_grad():
        features = model.backbone(image[None])
        before = model([image])[0]
    n_norms = sum(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules())
    assert fold_batchnorm(model) == n_norms == 20  # ResNet-18: stem + 16 in blocks + 3 downsamples
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules())
    with torch.no_grad():
        folded = model.backbone(image[None])
        after = model([image])[0]
    for key in features:
        torch.testing.assert_close(folded[key], features[key], atol=1e-4, rtol=1e-4)
    assert len(after["scores"]) == len(before["scores"]) > 0
    torch.testing.assert_close(after["scores"], before["scores"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after["boxes"], before["boxes"], atol=1e-2, rtol=1e-4)


def test_only_certain_pairs_are_folded() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3)
            self.bn2 = nn.BatchNorm2d(4)  # no conv2: its input is unknown
            self.seq = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.BatchNorm2d(4))  # not adjacent

    model = Odd().eval()
    assert fold_batchnorm(model) == 0
    with pytest.raises(RuntimeError, match="eval mode"):
        fold_batchnorm(model.train())
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).eval()
    randomise_norms(seq)
    x = torch.rand(2, 3, 9, 9)
    expected = seq(x)
    assert prepare_for_inference(seq, channels_last=True) == {"folded": 1, "channels_last": True}
    torch.testing.assert_close(seq(x), expected, atol=1e-5, rtol=1e-5)
    assert isinstance(seq[1], nn.Identity)


def test_fast_prompt_model_keeps_its_fourier_weights_usable() -> None:
    """Channels-last applies to convolution weights only: the LPM's Fourier filter still runs."""
    model, image, before = tiny_with_reference(name="maskrcnn_r18_prompt")
    prepare_for_inference(model, channels_last=True)
    with torch.no_grad():
        after = model([image])[0]
    assert len(after["scores"]) == len(before["scores"])
    torch.testing.assert_close(after["scores"], before["scores"], atol=1e-4, rtol=1e-4)


def test_bf16_autocast_runs_the_backbone_in_bf16_and_the_heads_in_float32() -> None:
    model, image, before = tiny_with_reference()
    seen: dict[str, torch.dtype] = {}
    model.backbone.body.conv1.register_forward_hook(lambda _m, _i, out: seen.update(conv1=out.dtype))
    model.roi_heads.box_predictor.register_forward_hook(lambda _m, _i, out: seen.update(box=out[1].dtype))
    FastOptions(fold=False, precision="bf16").apply(model, torch.device("cpu"))
    with torch.no_grad():
        after = model([image])[0]
    assert seen == {"conv1": torch.bfloat16, "box": torch.float32}  # box deltas, decoding and scores in float32
    assert {k: v.dtype for k, v in after.items() if v.is_floating_point()} == {
        "boxes": torch.float32, "scores": torch.float32, "roi_masks": torch.float32}
    assert len(after["scores"]) > 0
    assert after["scores"].max() == pytest.approx(before["scores"].max().item(), abs=0.05)
    copied = copy.deepcopy(model)  # the wrapped forward is a bound method: a copy runs its own backbone
    assert copied.backbone.forward.__self__ is copied.backbone
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        FastOptions(precision="fp16").apply(model, torch.device("cpu"))
    with pytest.raises(ValueError, match="backbone or encoder, which Sequential does not have"):
        FastOptions(compile=True).apply(nn.Sequential(nn.Conv2d(3, 3, 1)), torch.device("cpu"))


def test_compiled_backbone_gives_the_same_outputs() -> None:
    model, image, before = tiny_with_reference()
    keys = set(model.state_dict())
    FastOptions(fold=False, compile=True).apply(model, torch.device("cpu"))
    assert set(model.state_dict()) == keys  # compiled in place: checkpoints and attributes unchanged
    with torch.no_grad():
        after = model([image])[0]
    assert len(after["scores"]) == len(before["scores"]) > 0
    torch.testing.assert_close(after["scores"], before["scores"], atol=1e-4, rtol=1e-4)


def test_predict_precision_options(untrained_checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from rsiseg.cli import main
    from rsiseg.data.synthetic import generate_scene

    Image.fromarray(generate_scene(np.random.default_rng(0), 128)[0]).save(tmp_path / "a.png")
    args = ["-q", "predict", "--checkpoint", untrained_checkpoint, str(tmp_path / "a.png"), "--device", "cpu",
            "--score-threshold", "0", "--no-overlays"]
    assert main([*args, "--out", str(tmp_path / "fp16"), "--precision", "fp16"]) == 2
    assert "--precision fp16 needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "fp16").exists()
    assert main([*args, "--out", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    assert main([*args, "--out", str(tmp_path / "fp32")]) == 0
    bf16, fp32 = (sorted((r["score"] for r in json.loads((tmp_path / run / "predictions.json").read_text())),
                         reverse=True) for run in ("bf16", "fp32"))
    assert bf16 and fp32 and bf16[0] == pytest.approx(fp32[0], abs=0.02)
