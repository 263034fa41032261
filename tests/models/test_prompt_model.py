"""The prompt paradigm in the R-CNNs: PAreaLoss, jittered ground-truth prompts, fusion, the identity of the
baseline with every switch off, gradient flow, and box prompts through ``segment``."""

from __future__ import annotations

import math

import pytest
import torch

from rsiseg.config import ModelConfig, PromptConfig
from rsiseg.models.layers.box_prompting import encode_images, segment_boxes
from rsiseg.models.prompt.area_loss import best_iou_match, proposal_area_loss
from rsiseg.models.prompt.fusion import PromptFusion
from rsiseg.models.prompt.gt_prompts import JitteredGtPrompts, jitter_boxes
from rsiseg.models.registry import build_model
from tests.models.test_mask_rcnn import SIZE, target, tiny

OFF = PromptConfig(lpm=False, gpm=False, parea_weight=0.0, gt_prompt_ratio=0.0)
SMALL = dict(dim=16, global_size=64, global_patch=16, heads=2, blocks=1)


def prompt_cfg(name: str = "maskrcnn_r18_prompt", **prompt) -> ModelConfig:
    return tiny(name=name, prompt=PromptConfig(**{**SMALL, **prompt}))


def test_area_loss_matches_a_hand_computed_example() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 70.0, 60.0]])  # areas 100 and 200
    proposals = torch.tensor([
        [0.0, 0.0, 10.0, 12.0],     # IoU 100/120 with gt 0; area 120
        [50.0, 50.0, 68.0, 60.0],   # IoU 180/200 with gt 1; area 180
        [100.0, 100.0, 110.0, 110.0],  # meets nothing: left out
    ], requires_grad=True)
    loss = proposal_area_loss([proposals], [gt], iou_floor=0.5, eps=0.0)
    expected = (((120 - 100) / 100) ** 2 + ((180 - 200) / 200) ** 2) / 2
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert proposals.grad[:2].abs().sum() > 0 and proposals.grad[2].abs().sum() == 0
    # eps enters the denominator; the floor is strict
    assert proposal_area_loss([proposals], [gt], 0.5, eps=1.0).item() == pytest.approx(
        ((20 / 101) ** 2 + (20 / 201) ** 2) / 2)
    assert proposal_area_loss([proposals], [gt], iou_floor=0.85).item() == pytest.approx((20 / 201) ** 2)


def test_area_loss_of_half_precision_boxes_does_not_overflow() -> None:
    gt = torch.tensor([[0.0, 0.0, 600.0, 500.0]], dtype=torch.float16)  # 300,000 px²: past float16's 65,504
    proposals = torch.tensor([[0.0, 0.0, 600.0, 550.0]], dtype=torch.float16, requires_grad=True)
    loss = proposal_area_loss([proposals], [gt], eps=0.0)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.1 ** 2, rel=1e-3)


def test_area_loss_without_kept_proposals_is_an_attached_zero() -> None:
    proposals = torch.tensor([[0.0, 0.0, 5.0, 5.0]], requires_grad=True)
    loss = proposal_area_loss([proposals, proposals[:0]], [torch.tensor([[90.0, 90, 99, 99]]), torch.zeros(0, 4)])
    assert loss.item() == 0 and loss.requires_grad


def test_best_iou_match_in_chunks_equals_the_whole_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    from rsiseg.models.prompt import area_loss

    torch.manual_seed(0)
    xy = torch.rand(300, 2) * 100
    boxes = torch.cat([xy, xy + torch.rand(300, 2) * 30 + 1], 1)
    gt = boxes[torch.randperm(300)[:40]] + 2
    whole = best_iou_match(boxes, gt)
    monkeypatch.setattr(area_loss, "_IOU_CHUNK_ELEMENTS", 100)  # chunks of 2 proposals
    chunked = best_iou_match(boxes, gt)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_jitter_keeps_boxes_valid_and_near() -> None:
    torch.manual_seed(0)
    boxes = torch.tensor([[10.0, 10.0, 30.0, 20.0], [0.0, 0.0, 1.0, 1.0]])
    moved = jitter_boxes(boxes, 0.1)
    assert (moved[:, 2:] - moved[:, :2] >= 1 - 1e-6).all()
    assert ((moved[0] - boxes[0]).abs() <= torch.tensor([2.0, 1.0, 2.0, 1.0]) + 1e-6).all()
    assert torch.equal(jitter_boxes(boxes, 0.0), boxes)


def test_gt_prompts_add_a_share_of_instances_matched_to_themselves() -> None:
    torch.manual_seed(0)
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10]] * 8)}, {"boxes": torch.zeros(0, 4)}]
    rois = [torch.ones(3, 4), torch.ones(2, 4)]
    matched = [torch.tensor([0, 1, 2]), torch.tensor([0, 0])]
    out_rois, out_matched = JitteredGtPrompts(0.25, 0.05)(rois, matched, targets)
    assert [len(r) for r in out_rois] == [5, 2] and [len(m) for m in out_matched] == [5, 2]
    assert torch.equal(out_matched[0][:3], matched[0]) and (out_matched[0][3:] < 8).all()
    assert (out_rois[0][3:] - targets[0]["boxes"][:2]).abs().max() <= 0.5 + 1e-6


@pytest.mark.parametrize("names", [("maskrcnn_r18_fpn", "maskrcnn_r18_prompt"),
                                   ("cascade_maskrcnn_r18_fpn", "cascade_maskrcnn_r18_prompt")])
def test_switches_off_is_exactly_the_baseline(names: tuple[str, str]) -> None:
    torch.manual_seed(0)
    baseline = build_model(tiny(name=names[0]))
    torch.manual_seed(0)
    prompt_off = build_model(tiny(name=names[1], prompt=OFF))
    a, b = baseline.state_dict(), prompt_off.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)]
    targets = [target(3), target(1)]
    losses = []
    for model in (baseline, prompt_off):
        torch.manual_seed(1)
        model.train()
        losses.append(model(images, targets))
    assert losses[0].keys() == losses[1].keys()
    assert all(torch.equal(losses[0][k], losses[1][k]) for k in losses[0])
    outputs = [model.eval()(images) for model in (baseline, prompt_off)]
    for x, y in zip(*outputs):
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("name", ["maskrcnn_r18_prompt", "cascade_maskrcnn_r18_prompt"])
def test_prompt_modules_leave_the_baseline_initialisation(name: str) -> None:
    """An ablation's variants differ in their switches, not in the random start of the parts they share."""
    states, draws = [], []
    for prompt in ({"lpm": False, "gpm": False}, {"fuse": "mask_box"}):
        torch.manual_seed(0)
        states.append(build_model(prompt_cfg(name, **prompt)).state_dict())
        draws.append(torch.rand(3))  # what training draws next
    off, on = states
    assert set(off) < set(on) and all(torch.equal(off[k], on[k]) for k in off)
    assert torch.equal(*draws)


def test_prompts_of_an_image_do_not_depend_on_its_batch() -> None:
    from rsiseg.models.layers.box_prompting import prompt_context

    torch.manual_seed(0)
    model = build_model(prompt_cfg()).eval()
    small, large = torch.rand(3, 80, 120), torch.rand(3, 128, 96)  # padded together, the small one gains a border
    boxes = torch.tensor([[5.0, 10.0, 60.0, 70.0], [40.0, 0.0, 120.0, 30.0]])
    prompter = model.roi_heads.prompter
    maps = []
    for images in ([small], [small, large]):
        batch, _ = model.transform(images)
        rois = boxes * batch.image_sizes[0][0] / 80  # into the network input
        extra = [torch.zeros(0, 4)] * (len(images) - 1)
        maps.append(prompter.prompt_map([rois, *extra], prompt_context(model, images, batch)))
    torch.testing.assert_close(maps[0], maps[1])


def test_local_prompts_crop_the_image_at_its_own_resolution() -> None:
    from torchvision.models.detection.transform import resize_boxes

    from rsiseg.models.layers.box_prompting import prompt_context

    torch.manual_seed(0)
    model = build_model(prompt_cfg(gpm=False)).eval()
    image = torch.rand(3, 2 * SIZE, 3 * SIZE)  # not square: the transform shrinks it to fit SIZE
    batch, _ = model.transform([image])
    resized = tuple(batch.image_sizes[0])
    assert resized == (85, SIZE)
    context = prompt_context(model, [image], batch)
    assert context.images.shape[-2:] == image.shape[-2:]
    rois = torch.tensor([[4.0, 6.0, 30.0, 20.0], [60.0, 40.0, 120.0, 80.0]])  # network-input pixels
    lpm = model.roi_heads.prompter.lpm
    tokens = lpm(model.transform.normalize(image)[None], [resize_boxes(rois, resized, tuple(image.shape[-2:]))])
    side = int(tokens.shape[1] ** 0.5)
    expected = tokens.transpose(1, 2).reshape(len(rois), -1, side, side)
    torch.testing.assert_close(model.roi_heads.prompter.prompt_map([rois], context), expected)
    assert not torch.allclose(lpm(batch.tensors, [rois]), tokens, atol=1e-4)  # the old crops of the network input


def test_prompt_model_answers_box_prompts_and_refuses_degenerate_targets() -> None:
    torch.manual_seed(0)
    model = build_model(prompt_cfg()).eval()
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 80)]
    prompts = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]])}, {"boxes": torch.zeros(0, 4)}]
    answers = model(images, prompts=prompts)
    expected = segment_boxes(model, encode_images(model, images), [p["boxes"] for p in prompts])
    assert [len(a["labels"]) for a in answers] == [1, 0]
    torch.testing.assert_close(answers[0]["roi_masks"], expected[0]["roi_masks"])
    with pytest.raises(ValueError, match="box prompts only"):
        model(images[:1], prompts=[{"boxes": torch.zeros(0, 4), "points": torch.zeros(0, 2)}])
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        model(images, prompts=prompts)
    bad = target(2)
    bad["boxes"][1, 2] = bad["boxes"][1, 0]
    with pytest.raises(ValueError, match=r"positive width and height: target 1 has .*\(1 such boxes\)"):
        model([torch.rand(3, SIZE, SIZE)] * 2, [target(1), bad])


@pytest.mark.parametrize("name", ["maskrcnn_r18_prompt", "cascade_maskrcnn_r18_prompt"])
def test_every_new_parameter_gets_a_gradient(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(prompt_cfg(name, fuse="mask_box"))
    model.train()
    losses = model([torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)], [target(3), target(2)])
    assert "loss_parea" in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    prompter = model.roi_heads.prompter
    missing = [n for n, p in prompter.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing
    assert model.rpn.head.bbox_pred.weight.grad.abs().sum() > 0


def test_area_loss_reaches_the_rpn_box_deltas() -> None:
    torch.manual_seed(0)
    model = build_model(prompt_cfg(lpm=False, gpm=False, gt_prompt_ratio=0.0, parea_weight=1.0))
    model.train()
    losses = model([torch.rand(3, SIZE, SIZE)], [target(3)])
    assert losses["loss_parea"] > 0
    losses["loss_parea"].backward()
    assert model.rpn.head.bbox_pred.weight.grad.abs().sum() > 0
    assert model.rpn.head.cls_logits.weight.grad is None or model.rpn.head.cls_logits.weight.grad.abs().sum() == 0


def test_gated_fusion_starts_as_the_unprompted_features() -> None:
    fusion = PromptFusion(PromptConfig(**SMALL, fusion="gated"), in_channels=3, roi_channels=8)
    images = torch.rand(1, 3, 64, 64)
    features = torch.rand(2, 8, 14, 14)
    boxes = [torch.tensor([[0.0, 0, 20, 20], [10.0, 10, 60, 40]])]
    context = fusion.encode(images, [(64, 64)], [(64, 64)])
    assert torch.equal(fusion("mask", features, boxes, context), features)
    assert torch.equal(fusion("box", features[:, :, :7, :7], boxes, context), features[:, :, :7, :7])  # not fused
    with torch.no_grad():
        fusion.gate["mask"].fill_(1.0)
    assert not torch.equal(fusion("mask", features, boxes, context), features)


def test_fusion_needs_a_module() -> None:
    with pytest.raises(ValueError, match="model.prompt.lpm or model.prompt.gpm"):
        PromptFusion(OFF, 3, 8)


@pytest.mark.parametrize("name", ["maskrcnn_r18_fpn", "maskrcnn_r18_prompt", "cascade_maskrcnn_r18_prompt"])
def test_segment_gives_one_mask_per_box_inside_it(name: str) -> None:
    from rsiseg.inference.paste import paste_full

    torch.manual_seed(0)
    model = build_model(prompt_cfg(name) if "prompt" in name else tiny()).eval()
    with torch.no_grad():  # an untrained mask head gives ~0.5 everywhere: make its logits high so masks show
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(5.0)
    image = torch.rand(3, 96, 160)
    encoded = encode_images(model, [image])
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [100.0, 5.0, 150.0, 30.0], [0.0, 0.0, 160.0, 96.0]])
    out = segment_boxes(model, encoded, [boxes])[0]
    assert out["roi_masks"].shape == (3, 28, 28) and out["labels"].shape == (3,) and out["scores"].shape == (3,)
    assert torch.equal(out["boxes"], boxes) and ((out["labels"] >= 1) & (out["labels"] <= 3)).all()
    assert ((out["scores"] > 0) & (out["scores"] <= 1)).all()
    full = paste_full(out["roi_masks"], out["boxes"], (96, 160)) > 0.5
    for mask, (x1, y1, x2, y2) in zip(full, boxes.tolist()):
        assert mask.any()
        # pasting fades the mask out over one grid cell past the box edge (torchvision's (M + 2) / M growth)
        dx, dy = (x2 - x1) / 28 + 1, (y2 - y1) / 28 + 1
        outside = mask.clone()
        outside[max(0, int(y1 - dy)): int(y2 + dy) + 1, max(0, int(x1 - dx)): int(x2 + dx) + 1] = False
        assert not outside.any()
    empty = segment_boxes(model, encoded, [torch.zeros(0, 4)])[0]
    assert empty["roi_masks"].shape[0] == 0 and empty["labels"].shape == (0,)


def test_segment_answers_from_the_same_encoding_as_a_fresh_one() -> None:
    torch.manual_seed(0)
    model = build_model(prompt_cfg()).eval()
    image = torch.rand(3, SIZE, SIZE)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0]])
    encoded = encode_images(model, [image])
    first = segment_boxes(model, encoded, [boxes])[0]
    segment_boxes(model, encoded, [torch.tensor([[0.0, 0, 30, 30]])])
    again = segment_boxes(model, encoded, [boxes])[0]
    assert torch.equal(first["roi_masks"], again["roi_masks"]) and math.isclose(first["scores"][0], again["scores"][0])


@pytest.mark.parametrize("name", ["maskrcnn_r18_fpn", "cascade_maskrcnn_r18_prompt"])
def test_detections_from_an_encoding_equal_the_forward(name: str) -> None:
    from rsiseg.models.layers.box_prompting import detect_encoded

    torch.manual_seed(0)
    model = build_model(prompt_cfg(name) if "prompt" in name else tiny()).eval()
    images = [torch.rand(3, 96, 128), torch.rand(3, 128, 100)]
    with torch.no_grad():
        expected = model(images)
    got = detect_encoded(model, encode_images(model, images))
    for x, y in zip(expected, got):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
