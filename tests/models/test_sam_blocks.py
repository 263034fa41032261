"""PointSAM's leaf blocks on tiny CPU tensors: LoRA, prototypes, negative prompt calibration, losses."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from rsiseg.models.layers.lora import LoRALinear, add_lora, lora_parameters, trainable_parameters
from rsiseg.models.sam.calibration import exclusive_masks, negative_prompts, overlap_negatives
from rsiseg.models.sam.losses import dice_loss, focal_loss, mask_iou, sam_losses
from rsiseg.models.sam.prototypes import (
    PrototypeBank,
    gather_rows,
    hungarian_match,
    masked_average_pool,
    prototype_loss,
    spherical_kmeans,
)
from tests.engine.ddp_launch import rank_environment, spawn_ranks

EMBED, DEPTH, RANK = 32, 2, 4


def tiny_encoder() -> ImageEncoderViT:
    torch.manual_seed(0)
    return ImageEncoderViT(
        img_size=64,
        patch_size=8,
        embed_dim=EMBED,
        depth=DEPTH,
        num_heads=2,
        window_size=4,
        global_attn_indexes=(1,),
        out_chans=32,
        use_rel_pos=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


# --- LoRA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("parts", ["qv", "qkv", None])
def test_lora_starts_equal_to_base(parts: str | None) -> None:
    base = nn.Linear(8, 12)
    wrapped = LoRALinear(base, rank=2, alpha=4.0, parts=parts)
    x = torch.randn(3, 5, 8)
    assert torch.equal(wrapped(x), base(x))
    assert not base.weight.requires_grad and not base.bias.requires_grad


def test_lora_qv_leaves_key_third_alone() -> None:
    wrapped = LoRALinear(nn.Linear(8, 12), rank=2, parts="qv")
    with torch.no_grad():
        wrapped.lora_b.normal_()
    x = torch.randn(4, 8)
    delta = (wrapped(x) - wrapped.base(x)).unflatten(-1, (3, 4))
    assert delta[:, 1].abs().max() == 0
    assert delta[:, 0].abs().max() > 0 and delta[:, 2].abs().max() > 0
    expected_q = x @ wrapped.lora_a[0].T @ wrapped.lora_b[0].T * wrapped.scale
    torch.testing.assert_close(delta[:, 0], expected_q)


def test_lora_on_sam_encoder_counts_freezes_and_trains_adapters_only() -> None:
    encoder = tiny_encoder()
    x = torch.randn(1, 3, 64, 64)
    before = encoder(x)
    encoder.requires_grad_(False)
    assert add_lora(encoder, RANK) == DEPTH
    assert trainable_parameters(encoder) == DEPTH * 2 * RANK * (EMBED + 3 * EMBED // 3)
    assert all(isinstance(block.attn.qkv, LoRALinear) for block in encoder.blocks)
    torch.testing.assert_close(encoder(x), before)
    assert "blocks.0.attn.qkv.base.weight" in encoder.state_dict()
    assert "blocks.0.attn.qkv.lora_a" in encoder.state_dict()

    encoder(x).square().mean().backward()
    adapters = {id(p) for p in lora_parameters(encoder)}
    for name, param in encoder.named_parameters():
        if id(param) in adapters:
            assert param.grad is not None, name
        else:
            assert param.grad is None and not param.requires_grad, name
    # A is initialised non-zero and B zero, so at init only B receives a gradient.
    assert all(block.attn.qkv.lora_b.grad.abs().sum() > 0 for block in encoder.blocks)


def test_add_lora_rejects_bad_rank_and_no_match() -> None:
    with pytest.raises(ValueError, match="rank"):
        add_lora(tiny_encoder(), 0)
    with pytest.raises(ValueError, match="attn.qkv"):
        add_lora(nn.Sequential(nn.Linear(4, 4)), 2)
    encoder = tiny_encoder()
    add_lora(encoder, 2)
    with pytest.raises(ValueError, match="already wrapped"):
        add_lora(encoder, 2)


# --- prototypes ---------------------------------------------------------------------------------


def test_hungarian_recovers_permutation_and_rotation_cost() -> None:
    targets = torch.eye(3, 4)
    permutation = torch.tensor([2, 0, 1])
    pred = (targets[permutation] * 3.0).requires_grad_()
    pred_index, target_index = hungarian_match(pred, targets)
    assert pred_index.tolist() == [0, 1, 2]
    assert target_index.tolist() == permutation.tolist()
    loss = prototype_loss(pred, targets)
    assert loss.abs() < 1e-6
    loss.backward()
    assert pred.grad is not None

    angle = torch.tensor(0.3)
    rotated = torch.stack([torch.cos(angle), torch.sin(angle), torch.tensor(0.0), torch.tensor(0.0)])[None]
    torch.testing.assert_close(prototype_loss(rotated, targets), 1 - torch.cos(angle))
    assert hungarian_match(rotated, targets)[1].tolist() == [0]


def test_prototype_loss_empty_is_connected_zero() -> None:
    pred = torch.randn(0, 4, requires_grad=True)
    loss = prototype_loss(pred, torch.randn(3, 4))
    assert loss.item() == 0 and loss.requires_grad
    pred = torch.randn(2, 4, requires_grad=True)
    loss = prototype_loss(pred, torch.zeros(0, 4))
    loss.backward()
    assert loss.item() == 0 and torch.equal(pred.grad, torch.zeros(2, 4))


def test_masked_average_pool_exact_mean_and_vanished_mask() -> None:
    features = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4).requires_grad_()
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True  # the top-left 2x2 cells of image 1, fully covered
    masks[1, 0, 0] = True  # a quarter of cell (0, 0) of image 0
    protos, valid = masked_average_pool(features, masks, torch.tensor([1, 0, 0]))
    assert valid.tolist() == [True, True, False]
    torch.testing.assert_close(protos[0], features[1, :, :2, :2].mean(dim=(1, 2)))
    torch.testing.assert_close(protos[1], features[0, :, 0, 0])
    assert torch.equal(protos[2], torch.zeros(3))
    protos.sum().backward()
    assert features.grad is not None


def test_spherical_kmeans_separates_and_is_deterministic() -> None:
    generator = torch.Generator().manual_seed(1)
    a = torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(20, 3, generator=generator)
    b = torch.tensor([0.0, 0.0, 5.0]) + 0.2 * torch.randn(20, 3, generator=generator)
    points = torch.cat([a, b])
    centres = spherical_kmeans(points, 2, seed=3)
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(2))
    assign = (F.normalize(points, dim=1) @ centres.T).argmax(1)
    assert assign[:20].unique().numel() == 1 and assign[20:].unique().numel() == 1 and assign[0] != assign[20]
    assert torch.equal(centres, spherical_kmeans(points, 2, seed=3))
    assert spherical_kmeans(points[:3], 8).shape == (3, 3)
    assert spherical_kmeans(points[:0], 8).shape == (0, 3)


def test_prototype_bank_wraps_around_and_round_trips() -> None:
    bank = PrototypeBank(dim=2, size=4, k=2)
    assert bank.targets().shape == (0, 2)
    bank.recluster(seed=0)  # empty: no-op
    assert int(bank.num_centres) == 0
    bank.push(torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    bank.push(torch.tensor([[0.0, 4.0], [0.0, 5.0]]))
    assert int(bank.count) == 5 and bank.filled == 4
    assert bank.bank[:, 0].tolist() == [0.0, 2.0, 3.0, 0.0] and bank.bank[:, 1].tolist() == [5.0, 0.0, 0.0, 4.0]
    bank.push(torch.arange(12.0).view(6, 2))  # more than size: the newest 4 are kept, in ring order
    assert int(bank.count) == 11
    assert sorted(bank.bank[:, 0].tolist()) == [4.0, 6.0, 8.0, 10.0]
    assert bank.bank[(int(bank.count) - 1) % 4, 0] == 10.0
    bank.recluster(seed=0)
    assert bank.targets().shape == (2, 2)

    restored = PrototypeBank(dim=2, size=4, k=2)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.bank, bank.bank) and torch.equal(restored.targets(), bank.targets())
    assert int(restored.count) == 11
    assert gather_rows(bank.bank) is bank.bank  # outside a distributed run: the rows themselves


def _gather_rank(rank: int, world: int, port: int, results: str) -> None:
    """Rank r holds r rows of value r (rank 0 none); every rank pushes what :func:`gather_rows` returns."""
    rank_environment(rank, world, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        bank = PrototypeBank(dim=2, size=8, k=2)
        bank.push(gather_rows(torch.full((rank, 2), float(rank))))
        bank.recluster(seed=0)
        torch.save(bank.state_dict(), Path(results) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_pushes_every_ranks_prototypes(tmp_path: Path) -> None:
    assert spawn_ranks(_gather_rank, 3, str(tmp_path)) == [0, 0, 0]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(3)]
    assert int(states[0]["count"]) == 3 and states[0]["bank"][:3, 0].tolist() == [1.0, 2.0, 2.0]
    for state in states[1:]:
        assert all(torch.equal(state[key], states[0][key]) for key in state)  # the banks and centres agree


# --- negative prompt calibration ----------------------------------------------------------------


def two_overlapping_instances() -> tuple[torch.Tensor, torch.Tensor]:
    """Mask 0 has grown over instance 1 (a 16x16 image); both instances' points and masks overlap."""
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, 2:12, 2:12] = True
    masks[1, 8:14, 8:14] = True
    masks[2, 0:2, 14:16] = True  # a third instance far away
    points = torch.tensor([[4.5, 4.5], [10.2, 10.7], [15.0, 0.0]])
    return masks, points


def test_overlap_negatives_finds_each_other() -> None:
    masks, points = two_overlapping_instances()
    negatives = overlap_negatives(masks, points)
    assert [n.tolist() for n in negatives] == [[1], [0], []]
    # Overlap 16 px of a 36 px smaller mask = 0.44; instance 1's point still lies inside mask 0.
    strict = overlap_negatives(masks, points, min_overlap=0.5)
    assert [n.tolist() for n in strict] == [[1], [], []]


def test_negative_prompts_pad_with_sam_convention() -> None:
    points = torch.tensor([[1.0, 1.0], [2.0, 2.0], [9.0, 9.0], [3.0, 3.0]])
    negatives = [torch.tensor([2, 1]), torch.tensor([], dtype=torch.int64), torch.tensor([0]), torch.tensor([])]
    coords, labels = negative_prompts(points, negatives)
    assert coords.shape == (4, 3, 2) and labels.dtype == torch.int64
    assert labels.tolist() == [[1, 0, 0], [1, -1, -1], [1, 0, -1], [1, -1, -1]]
    assert coords[0].tolist() == [[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]]  # nearest negative first
    assert coords[1, 1:].abs().sum() == 0 and coords[2, 1].tolist() == [1.0, 1.0]
    capped, capped_labels = negative_prompts(points, negatives, max_negatives=1)
    assert capped.shape == (4, 2, 2) and capped[0, 1].tolist() == [2.0, 2.0]
    assert negative_prompts(points, [torch.tensor([], dtype=torch.int64)] * 4)[1].tolist() == [[1]] * 4


def test_exclusive_masks_separates_and_keeps_points() -> None:
    masks, points = two_overlapping_instances()
    masks[1, 4, 4] = True  # instance 1 also claims instance 0's point pixel
    out = exclusive_masks(masks, torch.tensor([0.5, 0.9, 0.1]), points)
    assert out.sum(0).max() <= 1
    assert (out <= masks).all()  # pixels are only taken away
    assert out[0, 4, 4] and out[1, 10, 10]
    assert torch.equal(out[2], masks[2])
    # The overlap 8..11 is nearer to point 1's pixel (10, 10) than to point 0's (4, 4).
    assert out[1, 8:12, 8:12].all() and not out[0, 8:12, 8:12].any()


def test_exclusive_masks_ties_go_to_the_higher_score() -> None:
    masks = torch.ones(2, 1, 5, dtype=torch.bool)
    points = torch.tensor([[0.5, 0.0], [4.5, 0.0]])
    out = exclusive_masks(masks, torch.tensor([0.2, 0.7]), points)
    assert out.int()[:, 0].tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]]  # the middle pixel is a tie


# --- losses -------------------------------------------------------------------------------------


def perfect_case() -> tuple[torch.Tensor, torch.Tensor]:
    targets = torch.zeros(2, 8, 8)
    targets[0, 2:6, 2:6] = 1.0
    targets[1, :, :3] = 1.0
    return (targets * 40 - 20).requires_grad_(), targets


def test_perfect_logits_give_zero_losses_and_iou_one() -> None:
    logits, targets = perfect_case()
    assert focal_loss(logits, targets).max() < 1e-6
    assert dice_loss(logits, targets).max() < 1e-6
    assert mask_iou(logits, targets).tolist() == [1.0, 1.0]
    assert mask_iou(torch.full((1, 4, 4), -5.0), torch.zeros(1, 4, 4)).tolist() == [1.0]  # empty vs empty
    assert mask_iou(torch.full((1, 4, 4), 5.0), torch.zeros(1, 4, 4)).tolist() == [0.0]
    losses = sam_losses(logits, targets, torch.ones(2))
    assert set(losses) == {"loss_focal", "loss_dice", "loss_iou"}
    assert all(value.dim() == 0 and value.item() < 1e-4 for value in losses.values())


def test_sam_losses_weights_and_iou_target() -> None:
    logits, targets = perfect_case()
    wrong = -logits.detach()
    iou_pred = torch.tensor([0.5, 0.25], requires_grad=True)
    both = torch.cat([logits, wrong]), torch.cat([targets, targets]), torch.cat([iou_pred, iou_pred])
    only_good = sam_losses(*both, torch.tensor([1.0, 1.0, 0.0, 0.0]), iou_weight=2.0)
    assert only_good["loss_iou"].item() == pytest.approx(2.0 * (0.5**2 + 0.75**2) / 2)
    per_mask = sam_losses(*both, None, reduce=False)
    assert per_mask["loss_dice"].shape == (4,) and per_mask["loss_dice"][2:].min() > 0.9
    assert per_mask["loss_iou"][2:].tolist() == [0.25, 0.0625]  # a wrong mask's true IoU is 0


def test_sam_losses_zero_weights_and_no_masks_stay_connected() -> None:
    logits, targets = perfect_case()
    iou_pred = torch.rand(2, requires_grad=True)
    losses = sam_losses(-logits, targets, iou_pred, torch.zeros(2))
    total = sum(losses.values())
    assert total.item() == 0
    total.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits)) and torch.equal(iou_pred.grad, torch.zeros(2))

    empty_logits = torch.zeros(0, 8, 8, requires_grad=True)
    empty = sam_losses(empty_logits, torch.zeros(0, 8, 8), torch.zeros(0, 1, requires_grad=True))
    assert all(value.item() == 0 and value.requires_grad for value in empty.values())
    sum(empty.values()).backward()
    with pytest.raises(ValueError, match="weights"):
        sam_losses(logits, targets, iou_pred, torch.ones(3))
