"""build_seg_resnet18: one training step (1 and 4 bands), the eval contract, odd sizes, skips, class weights."""

from __future__ import annotations

import json

import pytest
import torch

from rsiseg.config import ModelConfig, SegConfig
from rsiseg.models.semantic.seg_resnet import build_seg_resnet18

NUM_CLASSES = 6


def _cfg(in_channels: int = 3, **seg) -> ModelConfig:
    return ModelConfig(name="seg_resnet18", num_classes=NUM_CLASSES, in_channels=in_channels,
                       image_mean=[0.5] * in_channels, image_std=[0.25] * in_channels,
                       seg=SegConfig(decoder_channels=[32, 16, 16, 8, 8], **seg))


def _targets(batch: int, size: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        labels = torch.full((size, size), 255, dtype=torch.int64)
        rows, cols = torch.randint(0, size, (2, 40), generator=generator)
        labels[rows, cols] = torch.randint(0, NUM_CLASSES, (40,), generator=generator)
        targets.append({"labels": labels, "image_id": torch.tensor(0)})
    return targets


@pytest.mark.parametrize(("bands", "skips"), [(1, False), (4, True)])
def test_training_step_gives_finite_loss_and_gradients(bands, skips):
    torch.manual_seed(0)
    model = build_seg_resnet18(_cfg(bands, skip_connections=skips)).train()
    images = [torch.rand(bands, 64, 64) for _ in range(2)]
    losses = model(images, _targets(2, 64))
    assert set(losses) == {"loss_pce"} and torch.isfinite(losses["loss_pce"])
    losses["loss_pce"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.decoder.classifier.weight.grad.abs().sum() > 0


def test_unlabelled_images_give_zero_loss():
    model = build_seg_resnet18(_cfg()).train()
    target = {"labels": torch.full((32, 32), 255, dtype=torch.int64)}
    loss = model([torch.rand(3, 32, 32)] * 2, [target, target])["loss_pce"]
    loss.backward()
    assert loss.item() == 0.0


def test_eval_contract_any_size():
    model = build_seg_resnet18(_cfg()).eval()
    with torch.no_grad():
        outputs = model([torch.rand(3, 50, 70), torch.rand(3, 64, 64)])
        batched = model(torch.rand(2, 3, 33, 40))
    assert len(outputs) == 2 and len(batched) == 2
    for out, (h, w) in zip([*outputs, *batched], [(50, 70), (64, 64), (33, 40), (33, 40)]):
        assert set(out) == {"probs", "labels"}
        assert out["probs"].shape == (NUM_CLASSES, h, w) and out["probs"].dtype == torch.float32
        assert out["labels"].shape == (h, w) and out["labels"].dtype == torch.int64
        assert torch.allclose(out["probs"].sum(0), torch.ones(h, w), atol=1e-5)
        assert torch.equal(out["labels"], out["probs"].argmax(0))


def test_training_input_errors():
    model = build_seg_resnet18(_cfg()).train()
    with pytest.raises(ValueError, match="needs targets"):
        model([torch.rand(3, 32, 32)])
    with pytest.raises(ValueError, match="share one size"):
        model([torch.rand(3, 32, 32), torch.rand(3, 64, 64)], _targets(2, 32))
    bad = [{"labels": torch.full((32, 32), 9, dtype=torch.int64)}]
    with pytest.raises(ValueError, match="outside 0..5"):
        model([torch.rand(3, 32, 32)], bad)


def test_class_weights_loaded_into_checkpointed_buffer(tmp_path):
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"weights": [0.5, 1, 1, 2, 3, 0]}))
    model = build_seg_resnet18(_cfg(class_weights=str(path)))
    assert model.class_weights.tolist() == [0.5, 1, 1, 2, 3, 0]
    assert "class_weights" in model.state_dict()
    assert build_seg_resnet18(_cfg()).class_weights.tolist() == [1.0] * NUM_CLASSES


def test_local_backbone_checkpoint_is_loaded(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    reference = resnet18()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    cfg = _cfg()
    cfg.backbone_checkpoint = str(path)
    model = build_seg_resnet18(cfg)
    assert torch.equal(model.encoder.stem[0].weight, reference.conv1.weight)
    assert torch.equal(model.encoder.layers[3][1].conv2.weight, reference.layer4[1].conv2.weight)
