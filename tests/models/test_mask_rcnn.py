"""Mask R-CNN baselines: the model contract on tiny configs, bands, anchors and local weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection.roi_heads import maskrcnn_loss

from rsiseg.config import ModelConfig
from rsiseg.masks import InstanceMasks
from rsiseg.models.layers.mask_targets import mask_rcnn_loss
from rsiseg.models.registry import MODELS, build_model

SIZE = 128


def tiny(**overrides) -> ModelConfig:
    base = dict(name="maskrcnn_r18_fpn", num_classes=3, fpn_channels=64, min_size=SIZE, max_size=SIZE,
                roi_batch_size_per_image=64, rpn_batch_size_per_image=64, rpn_pre_nms_top_n_train=200,
                rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100,
                anchor_sizes=[[8], [16], [32], [64], [128]])
    base.update(overrides)
    return ModelConfig(**base)


def target(n: int, bands: int = 3) -> dict[str, torch.Tensor]:
    masks = torch.zeros((n, SIZE, SIZE), dtype=torch.uint8)
    boxes = []
    for i in range(n):
        x, y = 10 + 25 * i, 20 + 10 * i
        masks[i, y : y + 12, x : x + 20] = 1
        boxes.append([x, y, x + 20, y + 12])
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.arange(n, dtype=torch.int64) % 3 + 1, "masks": InstanceMasks.from_masks(masks)}


def test_registry_names() -> None:
    assert {"maskrcnn_r18_fpn", "maskrcnn_r34_fpn", "maskrcnn_r50_fpn", "maskrcnn_r101_fpn"} <= set(MODELS)
    with pytest.raises(ValueError, match="unknown model.name 'nope'.*maskrcnn_r50_fpn"):
        build_model(ModelConfig(name="nope"))


def test_training_step_gives_finite_losses_and_gradients() -> None:
    torch.manual_seed(0)
    model = build_model(tiny())
    model.train()
    losses = model([torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)], [target(3), target(1)])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_image_without_targets_gives_zero_box_and_mask_loss() -> None:
    torch.manual_seed(0)
    model = build_model(tiny())
    model.train()
    losses = model([torch.rand(3, SIZE, SIZE)], [target(0)])
    assert float(losses["loss_box_reg"]) == 0.0
    assert float(losses["loss_mask"]) == 0.0
    assert float(losses["loss_rpn_box_reg"]) == 0.0
    assert float(losses["loss_classifier"]) > 0.0  # every sampled RoI is background


def test_eval_output_contract() -> None:
    torch.manual_seed(0)
    model = build_model(tiny(box_score_thresh=0.0, detections_per_img=40))
    model.eval()
    with torch.no_grad():
        outputs = model([torch.rand(3, SIZE, SIZE), torch.rand(3, 96, 160)])
    for out, (h, w) in zip(outputs, [(SIZE, SIZE), (96, 160)]):
        n = len(out["boxes"])
        assert 0 < n <= 40
        assert out["boxes"].shape == (n, 4) and out["boxes"].dtype == torch.float32
        assert out["labels"].dtype == torch.int64 and out["labels"].min() >= 1 and out["labels"].max() <= 3
        assert out["scores"].shape == (n,) and bool(((out["scores"] >= 0) & (out["scores"] <= 1)).all())
        assert out["roi_masks"].shape == (n, 28, 28) and out["roi_masks"].dtype == torch.float32
        assert bool(((out["roi_masks"] >= 0) & (out["roi_masks"] <= 1)).all())
        assert out["image_size"].tolist() == [h, w]
        assert "masks" not in out  # no full-size mask is ever made by the model
        assert float(out["boxes"][:, 2].max()) <= w and float(out["boxes"][:, 3].max()) <= h


@pytest.mark.parametrize("bands", [1, 4])
def test_other_band_counts_run(bands: int) -> None:
    model = build_model(tiny(in_channels=bands, image_mean=[0.5] * bands, image_std=[0.25] * bands))
    assert model.backbone.body.conv1.in_channels == bands
    model.train()
    losses = model([torch.rand(bands, SIZE, SIZE)], [target(2)])
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        assert "roi_masks" in model([torch.rand(bands, SIZE, SIZE)])[0]


def test_compact_mask_loss_equals_torchvision_on_full_masks() -> None:
    """Targets sampled per RoI from InstanceMasks give torchvision's loss from full-size masks."""
    torch.manual_seed(0)
    full = target(3)["masks"].to_full()
    rois = [torch.tensor([[8.0, 18, 33, 34], [36, 29, 50, 44], [58.5, 39.2, 81, 53], [9, 21, 28, 30]])]
    matched = [torch.tensor([0, 1, 2, 0])]
    logits = torch.randn(4, 4, 28, 28)
    labels = torch.tensor([1, 2, 3])
    compact = mask_rcnn_loss(logits, rois, matched, [{"masks": InstanceMasks.from_masks(full), "labels": labels}])
    reference = maskrcnn_loss(logits, rois, [full], [labels], matched)
    assert torch.allclose(compact, reference, atol=1e-6)
    # After the model's resize, RoIs are mapped back to the source resolution through mask_scale.
    scaled = mask_rcnn_loss(logits, [rois[0] * 2], matched, [{"masks": InstanceMasks.from_masks(full), "labels": labels,
                                                             "mask_scale": torch.tensor([2.0, 2.0])}])
    assert torch.allclose(scaled, reference, atol=1e-6)


def test_full_size_tensor_masks_are_accepted() -> None:
    torch.manual_seed(0)
    model = build_model(tiny())
    model.train()
    dense = {**target(2), "masks": target(2)["masks"].to_full()}
    losses = model([torch.rand(3, SIZE, SIZE)], [dense])
    assert torch.isfinite(losses["loss_mask"]) and float(losses["loss_mask"]) > 0
    with pytest.raises(ValueError, match="target masks are for a 128x128 image, but the image is 96x128"):
        model([torch.rand(3, 128, 96)], [target(2)])


def test_normalisation_must_match_bands() -> None:
    with pytest.raises(ValueError, match="image_mean has 3 values but model.in_channels is 4"):
        build_model(tiny(in_channels=4))


def test_anchor_config_is_used_and_checked() -> None:
    model = build_model(tiny(anchor_sizes=[[8, 12], [16, 24], [32, 48], [64, 96], [128, 192]],
                             anchor_ratios=[[0.5, 1.0, 2.0]]))
    assert model.rpn.anchor_generator.num_anchors_per_location() == [6] * 5
    assert model.rpn.head.cls_logits.out_channels == 6
    with pytest.raises(ValueError, match="anchor_sizes needs 5 lists"):
        build_model(tiny(anchor_sizes=[[8], [16]]))


def test_dense_scene_limits() -> None:
    model = build_model(tiny(detections_per_img=1000, rpn_post_nms_top_n_test=2000))
    assert model.roi_heads.detections_per_img == 1000
    with pytest.raises(ValueError, match="detections_per_img must be in 1..1000"):
        build_model(tiny(detections_per_img=5000))


def test_local_backbone_checkpoint_is_loaded(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = resnet18()
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(tiny(backbone_checkpoint=str(path)))
    assert torch.equal(model.backbone.body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    bad = tmp_path / "bad.pth"
    torch.save({"something.else": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="backbone checkpoint does not fit"):
        build_model(tiny(backbone_checkpoint=str(bad)))


def test_local_checkpoint_adapts_stem_to_bands(tmp_path: Path) -> None:
    reference = resnet18()
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(tiny(backbone_checkpoint=str(path), in_channels=2, image_mean=[0.5] * 2, image_std=[0.2] * 2))
    expected = reference.conv1.weight.mean(dim=1, keepdim=True).repeat(1, 2, 1, 1) * 1.5
    assert torch.allclose(model.backbone.body.conv1.weight, expected)


def test_frozen_stages() -> None:
    model = build_model(tiny(trainable_layers=2, norm="frozen_bn"))
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.layer2.parameters())
    assert all(p.requires_grad for p in body.layer3.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["maskrcnn_r50_fpn", "maskrcnn_r101_fpn"])
def test_full_size_models_build_and_step(name: str) -> None:
    model = build_model(ModelConfig(name=name, num_classes=2, min_size=256, max_size=256))
    model.train()
    losses = model([torch.rand(3, SIZE, SIZE)], [target(2)])  # resized to 256 inside the model
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.slow
def test_training_step_on_5000_instances() -> None:
    """A dense 800 px scene: 5,000 instances of 8x8 px train without full-size masks."""
    rng = np.random.default_rng(0)
    corners = rng.integers(0, 792, (5000, 2)).astype(float)
    polygons = [[[x, y, x + 8, y, x + 8, y + 8, x, y + 8]] for x, y in corners]
    masks = InstanceMasks.from_coco(polygons, 800, 800)
    model = build_model(tiny(min_size=800, max_size=800))
    model.train()
    losses = model([torch.rand(3, 800, 800)],
                   [{"boxes": masks.boxes(), "labels": torch.ones(5000, dtype=torch.int64), "masks": masks}])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
