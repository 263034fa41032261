"""YOLACT / RELACT: heads, mask assembly, Fast NMS, the phase block, optimized sorting, the model contract."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from rsiseg.config import ModelConfig, PhaseConfig, YolactConfig, to_dict
from rsiseg.inference.export import prediction_to_coco
from rsiseg.models.layers.fourier import PhaseEnhancement
from rsiseg.models.registry import build_model
from rsiseg.models.yolact.heads import PredictionHead, ProtoNet
from rsiseg.models.yolact.losses import class_loss, semantic_targets
from rsiseg.models.yolact.masks import assemble_roi_logits
from rsiseg.models.yolact.postprocess import fast_nms, select_detections
from tests.models.test_mask_rcnn import SIZE, target


def tiny_yolact(**yolact) -> ModelConfig:
    options = dict(num_prototypes=8, head_channels=32, mask_size=14)
    options.update(yolact)
    return ModelConfig(name="yolact_r18", num_classes=3, fpn_channels=32, min_size=SIZE, max_size=SIZE,
                       anchor_sizes=[[8], [16], [32], [64], [128]], anchor_ratios=[[1.0, 0.5, 2.0]],
                       detections_per_img=50, yolact=YolactConfig(**options))


RELACT = dict(sorting="quality", phase=PhaseConfig(enabled=True))


def test_protonet_and_head_shapes() -> None:
    p3 = torch.rand(2, 32, 16, 20)
    assert ProtoNet(32, 8)(p3).shape == (2, 8, 32, 40)  # a quarter of the 128 x 160 input
    protos = ProtoNet(32, 8)(p3)
    assert (protos >= 0).all()  # ReLU after the last conv
    head = PredictionHead(32, 16, anchors=3, num_classes=4, prototypes=8, quality=True)
    levels = [torch.rand(2, 32, 16, 20), torch.rand(2, 32, 8, 10)]
    out = head(levels)
    n = 3 * (16 * 20 + 8 * 10)
    assert out.logits.shape == (2, n, 5) and out.deltas.shape == (2, n, 4)
    assert out.coefficients.shape == (2, n, 8) and out.coefficients.abs().max() <= 1
    assert out.quality.shape == (2, n)
    assert PredictionHead(32, 16, 3, 4, 8, quality=False)(levels).quality is None


def test_head_orders_anchors_location_major_as_the_anchor_generator() -> None:
    head = PredictionHead(4, 4, anchors=3, num_classes=1, prototypes=2)
    with torch.no_grad():
        for conv in (head.conf, head.box, head.coef):
            conv.weight.zero_()
            conv.bias.zero_()
        head.box.bias.copy_(torch.arange(12.0))  # anchor a, coordinate c -> 4a + c
    out = head([torch.rand(1, 4, 2, 3)])
    assert torch.equal(out.deltas[0, :3], torch.arange(12.0).view(3, 4))  # location 0: anchors 0, 1, 2
    assert torch.equal(out.deltas[0, 3:6], out.deltas[0, :3])  # location 1 repeats them


def test_mask_assembly_is_the_linear_combination_cropped_to_the_box() -> None:
    prototypes = torch.zeros(2, 16, 16)  # a 64 px input at a quarter
    prototypes[0, :, :8] = 1.0  # left half
    prototypes[1, :8, :] = 1.0  # top half
    coefficients = torch.tensor([[10.0, 0.0], [10.0, -10.0], [0.0, 5.0]])
    boxes = torch.tensor([[4.0, 36.0, 24.0, 56.0],   # bottom-left: prototype 0 only
                          [4.0, 4.0, 24.0, 24.0],    # top-left: left 10 minus top 10
                          [40.0, 4.0, 60.0, 24.0]])  # top-right: top half only
    logits = assemble_roi_logits(prototypes, coefficients, boxes, spatial_scale=0.25, size=4)
    assert logits.shape == (3, 4, 4)
    assert torch.allclose(logits[0], torch.full((4, 4), 10.0))
    assert torch.allclose(logits[1], torch.zeros(4, 4))
    assert torch.allclose(logits[2], torch.full((4, 4), 5.0))
    # A box across the edge of prototype 0 (input x 16-48 = prototype columns 4-12): the crop's left half is
    # inside, its right half outside; nothing of the map beyond the box enters.
    across = assemble_roi_logits(prototypes, coefficients[:1], torch.tensor([[16.0, 36.0, 48.0, 56.0]]), 0.25, 4)
    assert torch.allclose(across[0, :, :2], torch.full((4, 2), 10.0))
    assert torch.allclose(across[0, :, 2:], torch.zeros(4, 2))
    assert assemble_roi_logits(prototypes, coefficients[:0], boxes[:0], 0.25, 4).shape == (0, 4, 4)


def brute_force_fast_nms(boxes: torch.Tensor, threshold: float) -> torch.Tensor:
    """Box j goes when any box ranked above it (kept or not) overlaps it by more than ``threshold``."""
    keep = torch.ones(boxes.shape[:2], dtype=torch.bool)
    for g in range(boxes.shape[0]):
        iou = box_iou(boxes[g], boxes[g])
        for j in range(boxes.shape[1]):
            keep[g, j] = all(iou[i, j] <= threshold for i in range(j))
    return keep


def test_fast_nms_equals_the_brute_force_rule_on_random_boxes() -> None:
    generator = torch.Generator().manual_seed(0)
    for threshold in (0.3, 0.5, 0.7):
        xy = torch.rand(3, 40, 2, generator=generator) * 100
        wh = torch.rand(3, 40, 2, generator=generator) * 40 + 1
        boxes = torch.cat([xy, xy + wh], dim=-1)
        assert torch.equal(fast_nms(boxes, threshold), brute_force_fast_nms(boxes, threshold))
    assert fast_nms(torch.zeros(2, 0, 4), 0.5).shape == (2, 0)


def test_phase_block_keeps_the_shape_and_starts_as_the_identity() -> None:
    x = torch.randn(2, 8, 13, 10)
    for amplitude in ("mean", "unit"):
        for gate in ("channel", "scalar"):
            block = PhaseEnhancement(8, amplitude=amplitude, kernel=3, gate=gate)
            assert torch.equal(block(x), x)  # the gate starts at 0
            with torch.no_grad():
                block.gate.fill_(0.5)
            out = block(x)
            assert out.shape == x.shape and not torch.allclose(out, x)
    phase = PhaseEnhancement(8, amplitude="mean").phase_only(x)
    spectrum, original = torch.fft.rfft2(phase, norm="ortho"), torch.fft.rfft2(x, norm="ortho")
    # the phase is kept; every frequency of a channel has the same amplitude
    assert torch.allclose(torch.angle(spectrum), torch.angle(original), atol=1e-3)
    amplitude = spectrum.abs().flatten(2)
    interior = amplitude[..., 1:-1]  # the real-FFT edge columns are folded by irfft
    assert torch.allclose(interior, interior.mean(-1, keepdim=True).expand_as(interior), rtol=0.2)
    with pytest.raises(ValueError, match="amplitude"):
        PhaseEnhancement(8, amplitude="log")


def test_quality_ranking_keeps_the_well_masked_detection_that_confidence_drops() -> None:
    """Two overlapping candidates of one class: A is more confident, B has the better predicted mask.
    Ranking by confidence keeps A and suppresses B; ranking by confidence x quality keeps B. A third,
    separate detection whose confidence ranks it outside the top-k enters only under quality ranking."""
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [1.0, 1.0, 21.0, 21.0], [50.0, 50.0, 70.0, 70.0],
                          [80.0, 80.0, 90.0, 90.0]])
    confidence = torch.tensor([[0.9], [0.8], [0.6], [0.7]])
    quality = torch.tensor([[0.3], [0.9], [0.9], [0.2]])
    by_confidence = select_detections(confidence, confidence, boxes, 0.05, 0.5, top_k=3, max_detections=10)
    by_quality = select_detections(confidence, confidence * quality, boxes, 0.05, 0.5, top_k=3, max_detections=10)
    assert by_confidence.anchors.tolist() == [0, 3]  # B suppressed by A, C outside the top 3
    assert by_quality.anchors.tolist() == [1, 2]  # B suppresses A; C is in, D (0.14) is out of the top 3
    assert torch.allclose(by_quality.scores, torch.tensor([0.72, 0.54]))
    assert by_quality.labels.tolist() == [1, 1]


def test_class_loss_mines_three_negatives_per_positive() -> None:
    logits = torch.zeros(1, 10, 2)
    logits[0, :, 1] = torch.arange(10.0)  # negatives with a higher class-1 logit are harder
    labels = torch.zeros(1, 10, dtype=torch.int64)
    labels[0, 0] = 1
    labels[0, 9] = -1  # ignored, though the hardest
    loss = class_loss(logits, labels, negpos_ratio=3)
    expected = torch.nn.functional.cross_entropy(logits[0, [0, 8, 7, 6]], torch.tensor([1, 0, 0, 0]), reduction="sum")
    assert loss.item() == pytest.approx(expected.item())
    # an image without objects still gives negpos_ratio hardest negatives
    empty = class_loss(logits, torch.zeros(1, 10, dtype=torch.int64), negpos_ratio=3)
    expected = torch.nn.functional.cross_entropy(logits[0, [9, 8, 7]], torch.zeros(3, dtype=torch.int64),
                                                 reduction="sum")
    assert empty.item() == pytest.approx(expected.item())


def test_semantic_targets_are_class_unions_on_the_p3_grid() -> None:
    t = target(3)  # instances 20 x 12 px at (10, 20), (35, 30), (60, 40) with labels 1, 2, 3
    t["mask_scale"] = torch.tensor([1.0, 1.0])
    grid = semantic_targets(t, 3, SIZE // 8, SIZE // 8, stride=8)
    assert grid.shape == (3, 16, 16)
    assert grid[0, 3, 2] == 1 and grid[0, 3, 5] == 0  # the first instance covers x 10-30, y 20-32
    assert grid[1].sum() > 0 and grid[2].sum() > 0 and grid[:, 10:].sum() == 0


@pytest.mark.parametrize("yolact", [{}, RELACT], ids=["yolact", "relact"])
def test_training_step_gives_finite_losses_and_gradients(yolact: dict) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_yolact(**yolact))
    model.train()
    losses = model([torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)], [target(3), target(1)])
    expected = {"loss_conf", "loss_box", "loss_mask", "loss_semantic"} | ({"loss_quality"} if yolact else set())
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["head.coef.weight"].abs().sum() > 0 and grads["protonet.refine.2.weight"].abs().sum() > 0
    if yolact:
        assert grads["head.quality.weight"].abs().sum() > 0 and grads["phase.p3.gate"].abs().sum() > 0


def test_a_few_steps_reduce_the_loss_on_one_batch() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_yolact(**RELACT))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, targets = [torch.rand(3, SIZE, SIZE)], [target(3)]
    totals = []
    for _ in range(8):
        losses = model(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < 0.7 * totals[0]


def test_zero_targets_give_finite_losses_with_zero_box_and_mask_terms() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_yolact(**RELACT))
    model.train()
    losses = model([torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)], [target(0), target(0)])
    assert losses["loss_box"].item() == 0 and losses["loss_mask"].item() == 0 and losses["loss_quality"].item() == 0
    assert losses["loss_conf"].item() > 0  # the hardest negatives still teach background
    sum(losses.values()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("bands", [1, 4])
def test_eval_contract_and_band_counts(bands: int) -> None:
    torch.manual_seed(0)
    cfg = tiny_yolact(**RELACT)
    cfg.in_channels, cfg.image_mean, cfg.image_std = bands, [0.5] * bands, [0.25] * bands
    cfg.box_score_thresh = 0.0
    model = build_model(cfg).eval()
    with torch.no_grad():
        outputs = model([torch.rand(bands, 100, 150), torch.rand(bands, SIZE, SIZE)])
    for out, (height, width) in zip(outputs, [(100, 150), (SIZE, SIZE)]):
        assert set(out) == {"boxes", "labels", "scores", "roi_masks", "image_size"}
        count = len(out["boxes"])
        assert 0 < count <= cfg.detections_per_img
        assert out["roi_masks"].shape == (count, 14, 14) and 0 <= out["roi_masks"].min() <= out["roi_masks"].max() <= 1
        assert out["image_size"].tolist() == [height, width]
        assert out["boxes"][:, 2].max() <= width + 1e-3 and out["boxes"][:, 3].max() <= height + 1e-3  # original px
        assert ((out["labels"] >= 1) & (out["labels"] <= 3)).all()
        assert (out["scores"][:-1] >= out["scores"][1:]).all()
    results = prediction_to_coco(outputs[0], image_id=7, label_to_category_id=[1, 2, 3])
    assert len(results) == len(outputs[0]["boxes"]) and all("segmentation" in r for r in results)


def test_detection_cap_reaches_a_thousand() -> None:
    cfg = tiny_yolact(pre_nms_top_k=2000)
    cfg.detections_per_img, cfg.box_score_thresh, cfg.box_nms_thresh = 1000, 0.0, 1.0
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([torch.rand(3, SIZE, SIZE)])[0]
    assert len(out["boxes"]) == 1000


def test_relact_switches_change_only_their_parts() -> None:
    base = {n for n, _ in build_model(tiny_yolact()).named_parameters()}
    relact = {n for n, _ in build_model(tiny_yolact(**RELACT)).named_parameters()}
    extra = relact - base
    assert base < relact
    assert {n.split(".")[0] for n in extra} == {"phase", "head"}
    assert {n for n in extra if n.startswith("head")} == {"head.quality.weight", "head.quality.bias"}
    assert {n.split(".")[1] for n in extra if n.startswith("phase")} == {"p3", "p4", "p5"}


def test_ablate_trains_the_relact_variants_and_tabulates_them(synth_data, tmp_path) -> None:
    import json

    import yaml

    from rsiseg.cli import main
    from tests.conftest import tiny_config_dict

    raw = tiny_config_dict(synth_data, tmp_path / "unused")
    raw["model"] = {**to_dict(tiny_yolact()), "num_classes": raw["model"]["num_classes"]}
    raw["train"].update(max_iters=1, tensorboard=False)
    config = tmp_path / "yolact.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "ablation"
    assert main(["-q", "ablate", str(config), "--variants", "yolact,relact", "--out", str(out), "--speed-runs", "1",
                 "--device", "cpu"]) == 0
    table = json.loads((out / "ablation.json").read_text())["runs"]
    assert [r["variant"] for r in table] == ["yolact", "relact"]
    assert table[1]["params"] > table[0]["params"] and all(r["fps"] > 0 and r["gflops"] > 0 for r in table)
    stored = [yaml.safe_load((out / v / "config.yaml").read_text())["model"]["yolact"] for v in ("yolact", "relact")]
    assert (stored[0]["phase"]["enabled"], stored[0]["sorting"]) == (False, "confidence")
    assert (stored[1]["phase"]["enabled"], stored[1]["sorting"]) == (True, "quality")
    assert "| relact |" in (out / "ablation.md").read_text()
    assert main(["ablate", str(config), "--variants", "lpm", "--out", str(out)]) == 2  # a prompt variant


def test_parameter_breakdown_gives_every_relact_part_a_row() -> None:
    from rsiseg.evaluation.efficiency import parameter_breakdown

    names = ["backbone", "fpn", "phase enhancement", "protonet", "prediction head", "mask quality", "semantic head"]
    relact = {row.name: row.params for row in parameter_breakdown(build_model(tiny_yolact(**RELACT)))}
    yolact = {row.name: row.params for row in parameter_breakdown(build_model(tiny_yolact()))}
    assert list(relact) == list(yolact) == names  # nothing left over in an "other" row
    assert yolact["phase enhancement"] == yolact["mask quality"] == 0
    assert relact["phase enhancement"] > 0 and relact["mask quality"] > 0
    assert {k: v for k, v in relact.items() if k not in ("phase enhancement", "mask quality")} == {
        k: v for k, v in yolact.items() if k not in ("phase enhancement", "mask quality")}
