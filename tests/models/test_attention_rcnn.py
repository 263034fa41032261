"""The attention Mask R-CNN (EfficientNet-B0 + CBAM): blocks, heads, parameter count, the model contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from rsiseg.models.attention_rcnn.backbone import AttentionFPN
from rsiseg.models.attention_rcnn.heads import DropoutTwoMLPHead, ResidualMaskHead
from rsiseg.models.layers.cbam import CBAM
from rsiseg.models.registry import build_model
from tests.models.test_mask_rcnn import SIZE, target, tiny

STRIDE_ADJUSTED = [[8, 16], [16, 32], [32, 64], [64, 128], [128, 256]]


def tiny_effb0(**overrides):
    return tiny(**{"name": "maskrcnn_effb0_cbam", **overrides})


def test_cbam_keeps_shape_and_gates_in_unit_interval() -> None:
    torch.manual_seed(0)
    block = CBAM(32, reduction=16, kernel_size=7)
    x = torch.randn(2, 32, 9, 11)
    assert block(x).shape == x.shape
    assert block.channel.mlp[0].out_channels == 2  # 32 // 16
    channel_gate, spatial_gate = block.channel(x), block.spatial(x)
    assert channel_gate.shape == (2, 32, 1, 1) and spatial_gate.shape == (2, 1, 9, 11)
    assert bool(((channel_gate > 0) & (channel_gate < 1)).all())
    # Channel then spatial: the output is x * Mc(x) * Ms(x * Mc(x)).
    gated = x * channel_gate
    assert torch.allclose(block(x), gated * block.spatial(gated), atol=1e-6)
    assert CBAM(8, reduction=16).channel.mlp[0].out_channels == 1  # never a zero-width MLP
    with pytest.raises(ValueError, match="must be odd"):
        CBAM(8, kernel_size=4)


def test_attention_fpn_levels_strides_and_attention() -> None:
    fpn = AttentionFPN([24, 40, 112, 1280], 64)
    features = {str(i): torch.randn(1, c, 64 // 2**i, 64 // 2**i) for i, c in enumerate([24, 40, 112, 1280])}
    out = fpn(features)
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape[1:]) for v in out.values()] == [(64, 64, 64), (64, 32, 32), (64, 16, 16), (64, 8, 8),
                                                           (64, 4, 4)]
    assert len(fpn.attention) == 4 and all(isinstance(m, CBAM) for m in fpn.attention)
    plain = fpn.fpn(features)
    assert torch.allclose(out["0"], fpn.attention[0](plain["0"]))
    assert torch.equal(out["pool"], out["3"][:, :, ::2, ::2])  # P6 from the attended P5


def test_box_head_dropout_and_mask_head_residual() -> None:
    torch.manual_seed(0)
    head = DropoutTwoMLPHead(16 * 7 * 7, 32, dropout=0.3)
    x = torch.rand(50, 16, 7, 7)
    assert head(x).shape == (50, 32)
    head.eval()
    assert torch.equal(head(x), head(x))
    head.train()
    assert (head(x) == 0).float().mean() > (DropoutTwoMLPHead(16 * 7 * 7, 32, dropout=0.0)(x) == 0).float().mean()
    mask_head = ResidualMaskHead(16, 24, num_convs=4)
    assert mask_head(torch.rand(3, 16, 14, 14)).shape == (3, 24, 14, 14)
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in mask_head.modules()) == 4
    with torch.no_grad():  # with the conv stack silenced, only the 1x1 projection remains
        mask_head.convs[-3].weight.zero_()
    mask_head.eval()
    y = torch.rand(2, 16, 14, 14)
    bn = mask_head.convs[-2]
    stack_out = torch.relu(bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps))
    assert torch.allclose(mask_head(y), torch.relu(stack_out.view(1, -1, 1, 1) + mask_head.project(y)), atol=1e-5)


def test_parameter_count_matches_the_report() -> None:
    """15 classes plus background, 256-channel FPN, the report's anchors: about 24.3 M parameters."""
    model = build_model(tiny_effb0(num_classes=15, fpn_channels=256, anchor_sizes=STRIDE_ADJUSTED, rpn_fg_iou=0.5))
    total = sum(p.numel() for p in model.parameters())
    assert 24.2e6 < total < 24.4e6, total
    assert model.rpn.head.cls_logits.out_channels == 6  # 2 sizes x 3 ratios
    assert model.roi_heads.box_head.fc6.out_features == 1024
    assert model.roi_heads.box_predictor.cls_score.out_features == 16
    assert model.rpn.proposal_matcher.high_threshold == 0.5


def test_training_step_gives_finite_losses_and_gradients() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_effb0())
    model.train()
    losses = model([torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)], [target(3), target(1)])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name in ("backbone.body.cbam.0.channel.mlp.0.weight", "backbone.fpn.attention.3.spatial.conv.weight",
                 "roi_heads.mask_head.project.weight", "backbone.body.net.conv_stem.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and float(grad.abs().sum()) > 0, name


def test_image_without_targets_gives_zero_box_and_mask_loss() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_effb0())
    model.train()
    losses = model([torch.rand(3, SIZE, SIZE)], [target(0)])
    assert float(losses["loss_box_reg"]) == 0.0 and float(losses["loss_mask"]) == 0.0
    assert float(losses["loss_rpn_box_reg"]) == 0.0


@pytest.mark.parametrize("bands", [1, 4])
def test_eval_contract_with_other_band_counts(bands: int) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_effb0(in_channels=bands, image_mean=[0.5] * bands, image_std=[0.25] * bands,
                                   box_score_thresh=0.0, detections_per_img=30))
    assert model.backbone.body.net.conv_stem.in_channels == bands
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(bands, SIZE, SIZE), torch.rand(bands, 96, 160)])
    for image_out, (h, w) in zip(out, [(SIZE, SIZE), (96, 160)]):
        n = len(image_out["boxes"])
        assert 0 < n <= 30 and image_out["roi_masks"].shape == (n, 28, 28)
        assert image_out["labels"].min() >= 1 and image_out["labels"].max() <= 3
        assert image_out["image_size"].tolist() == [h, w]


def test_kaiming_initialisation_of_new_parts() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_effb0(fpn_channels=256))
    fc6 = model.roi_heads.box_head.fc6.weight
    assert abs(float(fc6.std()) - (2 / fc6.shape[1]) ** 0.5) < 0.05 * (2 / fc6.shape[1]) ** 0.5
    conv = model.roi_heads.mask_head.convs[0].weight  # fan-out mode: sqrt(2 / (C_out k k))
    expected = (2 / (conv.shape[0] * 9)) ** 0.5
    assert abs(float(conv.std()) - expected) < 0.05 * expected
    assert float(model.roi_heads.box_predictor.bbox_pred.weight.std()) < 0.002  # output layers start small
    assert float(model.backbone.fpn.fpn.layer_blocks[0][0].bias.abs().sum()) == 0


def test_local_backbone_checkpoint_and_frozen_stages(tmp_path: Path) -> None:
    torch.manual_seed(2)
    reference = timm.create_model("efficientnet_b0", pretrained=False)
    path = tmp_path / "effb0.pth"
    torch.save(reference.state_dict(), path)  # with its classifier, which is ignored
    model = build_model(tiny_effb0(backbone_checkpoint=str(path), trainable_layers=2, norm="frozen_bn"))
    net = model.backbone.body.net
    assert torch.equal(net.blocks[3][0].conv_pw.weight, reference.blocks[3][0].conv_pw.weight)
    assert not any(p.requires_grad for p in net.blocks[2].parameters())
    assert all(p.requires_grad for p in net.blocks[3].parameters())
    assert all(p.requires_grad for p in model.backbone.body.cbam.parameters())  # new parts always train
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="backbone checkpoint does not fit"):
        build_model(tiny_effb0(backbone_checkpoint=str(bad)))
    with pytest.raises(ValueError, match="bn or frozen_bn"):
        build_model(tiny_effb0(norm="gn"))


def test_anchors_per_location_must_agree_across_levels() -> None:
    with pytest.raises(ValueError, match="same anchors per location on every level"):
        build_model(tiny_effb0(anchor_sizes=[[8, 16], [16], [32], [64], [128]]))
