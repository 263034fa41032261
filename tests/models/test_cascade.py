"""Cascade Mask R-CNN: stage targets, stage losses, score averaging, the prompter hook and the model contract."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign, box_iou

from rsiseg.config import CascadeConfig, ModelConfig
from rsiseg.models.cascade import build_cascade_maskrcnn_r18_fpn, build_cascade_maskrcnn_r50_fpn
from rsiseg.models.layers.cascade_heads import CascadeMaskRoIHeads, cascade_stage_heads
from tests.models.test_mask_rcnn import SIZE, target

CLASSES = 3
CHANNELS = 8
STAGE_KEYS = {f"loss_{kind}_s{t}" for kind in ("classifier", "box_reg") for t in (1, 2, 3)}


def tiny(**overrides) -> ModelConfig:
    base = dict(name="cascade_maskrcnn_r18_fpn", num_classes=CLASSES, fpn_channels=32, min_size=SIZE, max_size=SIZE,
                roi_batch_size_per_image=32, rpn_batch_size_per_image=32, rpn_pre_nms_top_n_train=100,
                rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                anchor_sizes=[[8], [16], [32], [64], [128]])
    base.update(overrides)
    return ModelConfig(**base)


def make_heads(
    cascade: CascadeConfig | None = None, stage_heads: list | None = None, score_thresh: float = 0.05, **kwargs,
) -> CascadeMaskRoIHeads:
    """Heads on one 8-channel level of stride 4; the sampler keeps up to 1000 RoIs (all of them here)."""
    cascade = cascade or CascadeConfig()
    if stage_heads is None:
        stage_heads = cascade_stage_heads(TwoMLPHead(CHANNELS * 7 * 7, 32), CLASSES, len(cascade.stage_ious))
    return CascadeMaskRoIHeads(
        MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2), None, None,
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=1000, positive_fraction=0.5,
        bbox_reg_weights=None, score_thresh=score_thresh, nms_thresh=0.5, detections_per_img=100,
        mask_roi_pool=MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(CHANNELS, (CHANNELS,), 1), mask_predictor=MaskRCNNPredictor(CHANNELS, CHANNELS,
                                                                                             CLASSES + 1),
        stage_heads=stage_heads, cascade=cascade, **kwargs,
    )


def features(images: int = 1) -> dict[str, Tensor]:
    return {"0": torch.rand(images, CHANNELS, SIZE // 4, SIZE // 4)}


def shifted_proposals(box: list[float], shifts: list[float]) -> Tensor:
    """``box`` moved right by each shift."""
    return torch.tensor([[box[0] + d, box[1], box[2] + d, box[3]] for d in shifts], dtype=torch.float32)


def test_stage_targets_follow_each_stage_iou_and_box_weights() -> None:
    torch.manual_seed(0)
    cascade = CascadeConfig()
    heads = make_heads(cascade)
    first = target(2)  # boxes [10, 20, 30, 32] (class 1) and [35, 30, 55, 42] (class 2)
    proposals = torch.cat([shifted_proposals([10, 20, 30, 32], [0.5, 1.5, 2.5, 3.5, 4.5, 6, 7]),
                           shifted_proposals([35, 30, 55, 42], [1, 2.2, 3, 4, 6]), torch.tensor([[90.0, 90, 120, 120]])])
    empty = target(0)
    for index, (threshold, weights) in enumerate(zip(cascade.stage_ious, cascade.stage_box_weights)):
        samples = heads.select_stage_samples(index, [proposals, proposals[:4]], [first, empty])
        gt = first["boxes"]
        assert torch.equal(samples.boxes[0], torch.cat([proposals, gt]))  # ground truth added, all kept
        assert samples.is_gt[0].tolist() == [False] * len(proposals) + [True, True]
        iou, best = box_iou(gt, samples.boxes[0]).max(0)
        foreground = iou >= threshold
        assert 0 < int(foreground.sum()) < len(foreground) - 1  # the thresholds split these proposals
        assert torch.equal(samples.labels[0], torch.where(foreground, first["labels"][best], 0))
        expected = BoxCoder(weights).encode_single(gt[best], samples.boxes[0])
        assert torch.allclose(samples.regression_targets[0][foreground], expected[foreground], atol=1e-6)
        assert torch.equal(samples.matched[0][foreground], best[foreground])
        assert samples.labels[1].tolist() == [0] * 4  # no instance: all background
    # A stricter stage has fewer foreground RoIs.
    counts = [int((heads.select_stage_samples(i, [proposals], [first]).labels[0] > 0).sum()) for i in range(3)]
    assert counts[0] > counts[1] > counts[2]


def test_losses_have_stage_keys_and_stage_weights() -> None:
    proposals = [shifted_proposals([10, 20, 30, 32], [0, 2, 4, 8, 30]), shifted_proposals([35, 30, 55, 42], [1, 5])]
    targets = [target(2), target(1)]
    feats = features(2)

    def losses(weights: list[float]) -> dict[str, Tensor]:
        torch.manual_seed(0)
        heads = make_heads(CascadeConfig(stage_loss_weights=weights))
        heads.train()
        return heads(feats, proposals, [(SIZE, SIZE)] * 2, targets)[1]

    reference, reweighted = losses([1.0, 0.5, 0.25]), losses([1.0, 0.0, 0.5])
    assert set(reference) == STAGE_KEYS | {"loss_mask"}
    assert all(torch.isfinite(v) and float(v) > 0 for v in reference.values())
    for kind in ("classifier", "box_reg"):
        assert torch.allclose(reweighted[f"loss_{kind}_s1"], reference[f"loss_{kind}_s1"])
        assert float(reweighted[f"loss_{kind}_s2"]) == 0.0
        assert torch.allclose(reweighted[f"loss_{kind}_s3"], 2 * reference[f"loss_{kind}_s3"])
    assert torch.allclose(reweighted["loss_mask"], reference["loss_mask"])


def test_training_step_gives_finite_losses_and_gradients_in_every_stage() -> None:
    torch.manual_seed(0)
    model = build_cascade_maskrcnn_r18_fpn(tiny())
    model.train()
    losses = model([torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)], [target(3), target(1)])
    assert set(losses) == STAGE_KEYS | {"loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    for stage in model.roi_heads.stages:
        for part in (stage.box_head, stage.box_predictor):
            assert sum(float(p.grad.abs().sum()) for p in part.parameters()) > 0


def test_image_without_targets_gives_zero_box_and_mask_loss() -> None:
    torch.manual_seed(0)
    model = build_cascade_maskrcnn_r18_fpn(tiny())
    model.train()
    losses = model([torch.rand(3, SIZE, SIZE)], [target(0)])
    for t in (1, 2, 3):
        assert float(losses[f"loss_box_reg_s{t}"]) == 0.0
        assert float(losses[f"loss_classifier_s{t}"]) > 0.0  # every sampled RoI is background
    assert float(losses["loss_mask"]) == 0.0


def test_eval_output_contract_and_zero_detections() -> None:
    torch.manual_seed(0)
    model = build_cascade_maskrcnn_r18_fpn(tiny(box_score_thresh=0.0, detections_per_img=40))
    model.eval()
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, 96, 160)]
    with torch.no_grad():
        outputs = model(images)
    for out, (h, w) in zip(outputs, [(SIZE, SIZE), (96, 160)]):
        n = len(out["boxes"])
        assert 0 < n <= 40
        assert out["boxes"].shape == (n, 4) and out["boxes"].dtype == torch.float32
        assert out["labels"].dtype == torch.int64 and out["labels"].min() >= 1 and out["labels"].max() <= CLASSES
        assert out["scores"].shape == (n,) and bool(((out["scores"] >= 0) & (out["scores"] <= 1)).all())
        assert out["roi_masks"].shape == (n, 28, 28) and out["roi_masks"].dtype == torch.float32
        assert out["image_size"].tolist() == [h, w]
        assert float(out["boxes"][:, 2].max()) <= w and float(out["boxes"][:, 3].max()) <= h
    model.roi_heads.score_thresh = 1.0  # no softmax score is above 1: nothing is detected
    with torch.no_grad():
        out = model(images[:1])[0]
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,) and out["scores"].shape == (0,)
    assert out["roi_masks"].shape == (0, 28, 28)


class FixedPredictor(nn.Module):
    """Stage predictor with the same class logits ``[num_classes + 1]`` and deltas ``[4]`` for every RoI."""

    def __init__(self, logits: list[float], deltas: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))
        self.register_buffer("deltas", torch.tensor(deltas))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.logits.expand(len(x), -1), self.deltas.expand(len(x), -1)


def test_eval_scores_are_the_mean_of_stage_softmax_and_boxes_the_last_regression() -> None:
    logits = [[0.0, 2.0, -1.0, 0.5], [1.0, 0.0, 3.0, -2.0], [-1.0, 1.0, 1.0, 2.5]]
    deltas = [[0.5, 0.0, 0.2, 0.0], [0.0, 1.0, 0.0, -0.5], [-1.0, 0.5, 0.3, 0.3]]
    cascade = CascadeConfig()
    heads = make_heads(cascade, [(nn.Flatten(), FixedPredictor(c, d)) for c, d in zip(logits, deltas)],
                       score_thresh=0.0)
    heads.eval()
    proposal = torch.tensor([[20.0, 30, 60, 50]])
    feats = features()
    with torch.no_grad():
        out = heads(feats, [proposal], [(SIZE, SIZE)])[0][0]
        probs = heads.box_class_probs(feats, [proposal], [(SIZE, SIZE)])
    expected_probs = torch.tensor(logits).softmax(-1).mean(0)
    assert out["labels"].tolist() == (expected_probs[1:].argsort(descending=True) + 1).tolist()  # one per class
    assert torch.allclose(out["scores"], expected_probs[out["labels"]])
    assert torch.allclose(probs, expected_probs[None])
    box = proposal
    for d, weights in zip(deltas, cascade.stage_box_weights):
        box = BoxCoder(weights).decode_single(torch.tensor([d]), box)
    assert torch.allclose(out["boxes"], box.expand(3, -1), atol=1e-4)
    assert out["roi_masks"].shape == (3, 28, 28)


class RecordingPrompter(nn.Module):
    """Records ``(kind, boxes per image, context)`` of each call and returns the features unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[int], object]] = []

    def forward(self, kind: str, features: Tensor, boxes: list[Tensor], context: object) -> Tensor:
        assert len(features) == sum(len(b) for b in boxes)
        self.calls.append((kind, [len(b) for b in boxes], context))
        return features


def test_prompter_sees_every_stage_box_features() -> None:
    torch.manual_seed(0)
    prompter = RecordingPrompter()
    heads = make_heads(prompter=prompter)
    proposals = [shifted_proposals([10, 20, 30, 32], [0, 2, 4, 30])]
    heads.train()
    heads(features(), proposals, [(SIZE, SIZE)], [target(2)], prompt_context="ctx")
    assert [kind for kind, _, _ in prompter.calls] == ["box", "box", "box", "mask"]
    assert all(context == "ctx" for _, _, context in prompter.calls)
    prompter.calls.clear()
    heads.eval()
    with torch.no_grad():
        heads(features(), proposals, [(SIZE, SIZE)], prompt_context="ctx")
    assert [kind for kind, _, _ in prompter.calls] == ["box", "box", "box", "mask"]
    assert [n for _, n, _ in prompter.calls[:3]] == [[4]] * 3  # each stage scores the same RoIs in eval
    prompter.calls.clear()
    with torch.no_grad():
        heads(features(), proposals, [(SIZE, SIZE)])  # no context: no prompts
    assert prompter.calls == []


@pytest.mark.parametrize(("overrides", "field"), [
    ({"stage_box_weights": [[10.0, 10.0, 5.0, 5.0]] * 2}, "model.cascade.stage_box_weights"),
    ({"stage_loss_weights": [1.0, 0.5]}, "model.cascade.stage_loss_weights"),
    ({"stage_ious": [], "stage_box_weights": [], "stage_loss_weights": []}, "model.cascade.stage_ious"),
])
def test_mismatched_stage_lists_name_the_field(overrides: dict, field: str) -> None:
    cascade = CascadeConfig(**overrides)
    with pytest.raises(ValueError, match=field):
        make_heads(cascade, cascade_stage_heads(TwoMLPHead(CHANNELS * 49, 32), CLASSES, len(cascade.stage_ious)))
    with pytest.raises(ValueError, match=field):
        build_cascade_maskrcnn_r18_fpn(tiny(cascade=cascade))


def test_single_stage_ious_are_refused_not_ignored() -> None:
    with pytest.raises(ValueError, match=r"model.roi_fg_iou is 0.6, but .* model.cascade.stage_ious \(now \[0.5, 0.6, 0.7\]\)"):
        build_cascade_maskrcnn_r18_fpn(tiny(roi_fg_iou=0.6))


def test_stage_heads_must_match_the_stages() -> None:
    with pytest.raises(ValueError, match="2 stage heads .* 3 stages"):
        make_heads(stage_heads=cascade_stage_heads(TwoMLPHead(CHANNELS * 49, 32), CLASSES, 2))


@pytest.mark.parametrize("builder", [build_cascade_maskrcnn_r18_fpn, build_cascade_maskrcnn_r50_fpn])
def test_builders_name_parameters_by_stage(builder) -> None:
    state = builder(tiny(fpn_channels=32)).state_dict()
    for t in range(3):
        assert state[f"roi_heads.stages.{t}.box_head.fc6.weight"].shape == (256, 32 * 7 * 7)
        assert state[f"roi_heads.stages.{t}.box_predictor.cls_score.weight"].shape == (CLASSES + 1, 256)
        assert state[f"roi_heads.stages.{t}.box_predictor.bbox_pred.weight"].shape == (4, 256)
    assert "roi_heads.mask_predictor.mask_fcn_logits.weight" in state
    assert not any(k.startswith(("roi_heads.box_head", "roi_heads.box_predictor")) for k in state)
    assert not any(k.startswith("roi_heads.stages.3") for k in state)
