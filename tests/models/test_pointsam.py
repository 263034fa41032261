"""PointSAM: the SAM builder and weight loading, the three training modes, the EMA teacher, LoRA, the answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rsiseg.config import ModelConfig, SamConfig
from rsiseg.masks import InstanceMasks
from rsiseg.models.registry import build_model
from rsiseg.models.sam.build import VARIANTS, build_sam, load_sam_weights
from rsiseg.models.sam.model import PointSam, to_sam_coordinates
from rsiseg.models.sam.pseudo_labels import teacher_pseudo_masks
from rsiseg.structures import masks_to_boxes

SIZE = 96


def tiny_sam(**sam) -> ModelConfig:
    options = dict(prompts_per_image=4, prototype_interval=2, prototype_bank=16, num_prototypes=2)
    options.update(sam)
    return ModelConfig(name="pointsam_tiny", num_classes=2, sam=SamConfig(**options))


def square_target(boxes: list[tuple[int, int, int, int]], size: int = SIZE) -> dict:
    masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, y1:y2, x1:x2] = 1
    points = torch.tensor([[(x1 + x2) / 2, (y1 + y2) / 2] for x1, y1, x2, y2 in boxes], dtype=torch.float32)
    return {"masks": InstanceMasks.from_masks(masks), "points": points.reshape(-1, 2),
            "labels": torch.ones(len(boxes), dtype=torch.int64),
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)}


def batch() -> tuple[list[torch.Tensor], list[dict]]:
    torch.manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, 80)]
    targets = [square_target([(10, 10, 30, 30), (40, 50, 70, 90), (60, 5, 90, 25)]),
               square_target([(5, 5, 20, 20)], size=SIZE)]
    targets[1]["masks"] = InstanceMasks(targets[1]["masks"].instances, SIZE, 80)
    return images, targets


def test_the_official_variants_have_the_released_sizes() -> None:
    assert VARIANTS["vit_b"].embed_dim == 768 and VARIANTS["vit_b"].depth == 12
    assert VARIANTS["vit_l"].global_attn == (5, 11, 17, 23) and VARIANTS["vit_h"].embed_dim == 1280
    assert all(VARIANTS[v].image_size == 1024 and VARIANTS[v].prompt_dim == 256 for v in ("vit_b", "vit_l", "vit_h"))


def test_tiny_sam_loads_a_state_dict_and_refuses_a_wrong_one(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_sam("tiny")
    path = tmp_path / "sam_tiny.pth"
    torch.save(source.state_dict(), path)  # the official files are plain state dicts
    target = build_sam("tiny", checkpoint=path)
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    bad = tmp_path / "other.pth"
    state = source.state_dict()
    state.pop("mask_decoder.iou_token.weight")
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"other\.pth.*missing: mask_decoder\.iou_token\.weight"):
        load_sam_weights(build_sam("tiny"), bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_sam("tiny", checkpoint=tmp_path / "absent.pth")


def test_a_three_band_checkpoint_loads_into_a_one_band_sam(tmp_path: Path) -> None:
    source = build_sam("tiny")
    path = tmp_path / "rgb.pth"
    torch.save(source.state_dict(), path)
    sar = build_sam("tiny", in_channels=1, checkpoint=path)
    rgb_filter = source.image_encoder.patch_embed.proj.weight
    assert torch.allclose(sar.image_encoder.patch_embed.proj.weight[:, 0], rgb_filter.sum(dim=1), atol=1e-6)


def test_an_rsiseg_checkpoint_of_a_pretrained_point_sam_starts_the_next_stage(tmp_path: Path) -> None:
    pretrained = build_model(tiny_sam(mode="supervised", trainable="all"))
    path = tmp_path / "best.pth"
    torch.save({"model": pretrained.state_dict(), "iteration": 3}, path)
    adapted = build_model(tiny_sam(mode="pointsam", checkpoint=str(path)))
    assert torch.equal(adapted.sam.mask_decoder.iou_token.weight, pretrained.sam.mask_decoder.iou_token.weight)
    assert torch.equal(adapted.teacher.mask_decoder.iou_token.weight, pretrained.sam.mask_decoder.iou_token.weight)


@pytest.mark.parametrize("mode", ["supervised", "self_training", "pointsam"])
def test_one_training_step_in_each_mode(mode: str) -> None:
    model = build_model(tiny_sam(mode=mode, confidence=0.0))  # an untrained teacher's IoU guesses are low
    model.train()
    images, targets = batch()
    losses = model(images, targets)
    expected = {"loss_focal", "loss_dice", "loss_iou"} | ({"loss_proto"} if mode == "pointsam" else set())
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert trained and all(n.startswith("sam.mask_decoder.") for n in trained)  # the default: the decoder alone
    assert all(not p.requires_grad for p in model.sam.prompt_encoder.parameters())
    if mode != "supervised":
        assert all(not p.requires_grad for p in model.teacher.parameters())


def test_the_supervised_targets_land_under_the_points() -> None:
    model = build_model(tiny_sam(mode="supervised"))
    images, targets = batch()
    _, scale = model.prepare(images[0])
    goals = model._mask_targets(targets[0], torch.arange(3), scale, (SIZE, SIZE))
    assert goals.shape == (3, model.low_res, model.low_res)
    for goal, point in zip(goals, targets[0]["points"] * scale * model.low_res / model.image_size):
        assert goal[int(point[1]), int(point[0])] > 0.9


def test_an_image_without_instances_gives_zero_losses_with_a_graph() -> None:
    model = build_model(tiny_sam(mode="self_training"))
    model.train()
    empty = square_target([])
    losses = model([torch.rand(3, SIZE, SIZE)], [empty])
    assert all(v.item() == 0 for v in losses.values())
    sum(losses.values()).backward()


def test_the_teacher_is_the_ema_of_the_student() -> None:
    model = build_model(tiny_sam(mode="self_training", ema_momentum=0.9))
    model.train()
    images, targets = batch()
    before = model.teacher.mask_decoder.iou_token.weight.clone()
    with torch.no_grad():
        model.sam.mask_decoder.iou_token.weight.add_(1.0)  # as an optimizer step would move the student
    student = model.sam.mask_decoder.iou_token.weight.clone()
    model(images, targets)  # each training forward first updates the teacher
    assert torch.allclose(model.teacher.mask_decoder.iou_token.weight, 0.9 * before + 0.1 * student, atol=1e-6)


def test_lora_trains_the_adapters_and_the_decoder_only() -> None:
    model = build_model(tiny_sam(mode="supervised", trainable="lora", lora_rank=2))
    variant = VARIANTS["tiny"]
    dim = variant.embed_dim
    adapters = variant.depth * 2 * 2 * (dim + dim)  # per block: q and v, rank 2, (in + out / 3) = dim + dim
    decoder = sum(p.numel() for p in model.sam.mask_decoder.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == adapters + decoder
    model.train()
    images, targets = batch()
    sum(model(images, targets).values()).backward()
    encoder_grads = [n for n, p in model.sam.image_encoder.named_parameters() if p.grad is not None]
    assert encoder_grads and all("lora_" in n for n in encoder_grads)


def test_answers_follow_the_contract_and_reuse_one_encoding() -> None:
    model = build_model(tiny_sam(mode="supervised")).eval()
    images, targets = batch()
    calls = []
    model.sam.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    prompts = [{"points": targets[0]["points"], "labels": torch.tensor([1, 2, 1])},
               {"points": torch.zeros(0, 2)}]
    answers = model(images, prompts=prompts)
    assert len(calls) == 1  # the batch is encoded once for every prompt
    first, empty = answers
    assert first["masks"].shape == (3, 1, SIZE, SIZE) and first["masks"].min() >= 0 and first["masks"].max() <= 1
    assert first["scores"].shape == (3,) and first["boxes"].shape == (3, 4)
    assert first["labels"].tolist() == [1, 2, 1]
    assert empty["masks"].shape == (0, 1, SIZE, 80) and empty["scores"].shape == (0,)
    with pytest.raises(ValueError, match="prompts"):
        model(images)


def test_negative_points_and_boxes_are_answered() -> None:
    model = build_model(tiny_sam(mode="supervised")).eval()
    encoded = model.encode([torch.rand(3, SIZE, SIZE)])
    points = torch.tensor([[[20.0, 20.0], [60.0, 60.0]]])
    answer = model.answer(encoded, 0, points=points, point_labels=torch.tensor([[1, 0]]),
                          boxes=torch.tensor([[5.0, 5.0, 40.0, 40.0]]))
    assert answer["masks"].shape == (1, 1, SIZE, SIZE)
    boxes_only = model.answer(encoded, 0, boxes=torch.tensor([[5.0, 5.0, 40.0, 40.0], [50, 50, 90, 90]]))
    assert boxes_only["masks"].shape == (2, 1, SIZE, SIZE)


def test_calibration_turns_covered_points_into_negative_prompts_and_separates_the_masks() -> None:
    model: PointSam = build_model(tiny_sam(mode="pointsam", multimask=False))
    low = model.low_res
    calls = []

    def fake_decode(embedding, points, labels, boxes=None, multimask=False, model=None):
        """First call: each point answered by one blob covering both objects; with negatives, the own half only."""
        calls.append(labels.clone())
        logits = torch.full((len(points), 1, low, low), -10.0)
        if (labels == 0).any():
            for i, point in enumerate(points[:, 0] * low / 256):
                logits[i, 0, :, int(point[0]) - 4:int(point[0]) + 4] = 10.0  # a column strip around its point
        else:
            logits[:, 0, :, 10:100] = 10.0  # one blob holding both points
        return logits, torch.full((len(points), 1), 0.9)

    model.decode = fake_decode
    points = torch.tensor([[40.0, 100.0], [180.0, 100.0]])  # input frame (256): low-res x = 20 and 90 at L = 128
    masks, iou = teacher_pseudo_masks(model, torch.zeros(1, 64, 32, 32), points)
    assert len(calls) == 2 and calls[1].tolist() == [[1, 0], [1, 0]]  # each other's point as a negative
    assert (masks.sum(dim=0) <= 1).all()  # exclusive
    assert low == 128
    assert masks[0, 50, 20] == 1 and masks[1, 50, 90] == 1 and masks[0, 50, 90] == 0 and masks[1, 50, 20] == 0
    assert iou.tolist() == pytest.approx([0.9, 0.9])
    model.options.calibration = False
    calls.clear()
    blob, _ = teacher_pseudo_masks(model, torch.zeros(1, 64, 32, 32), points)
    assert len(calls) == 1 and (blob.sum(dim=0) == 2).any()  # uncalibrated: both hold the shared blob


def test_four_band_images_train_and_answer() -> None:
    cfg = tiny_sam(mode="supervised")
    cfg.in_channels, cfg.image_mean, cfg.image_std = 4, [0.5] * 4, [0.25] * 4
    model = build_model(cfg)
    model.train()
    images, targets = batch()
    losses = model([torch.cat([img, img[:1]]) for img in images], targets)
    assert torch.isfinite(sum(losses.values()))
    model.eval()
    answer = model([torch.rand(4, 50, 70)], prompts=[{"points": torch.tensor([[10.0, 20.0]])}])[0]
    assert answer["masks"].shape == (1, 1, 50, 70)


def test_the_teacher_shares_what_never_trains() -> None:
    model = build_model(tiny_sam(mode="self_training"))  # decoder only: the encoders are frozen
    assert model.teacher.image_encoder is model.sam.image_encoder
    assert model.teacher.prompt_encoder is model.sam.prompt_encoder
    assert model.teacher.mask_decoder is not model.sam.mask_decoder
    lora = build_model(tiny_sam(mode="self_training", trainable="lora"))
    assert lora.teacher.image_encoder is not lora.sam.image_encoder  # its adapters train


def test_mask_boxes_and_sam_coordinates() -> None:
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 9, 11] = True
    assert masks_to_boxes(masks).tolist() == [[3, 2, 9, 5], [11, 9, 12, 10], [0, 0, 0, 0]]
    # The prompt encoder adds half a pixel to an index: a continuous centre 10.5 at scale 2 lands on 21.
    assert to_sam_coordinates(torch.tensor([[10.5, 3.5]]), 2.0).tolist() == [[20.5, 6.5]]
