"""SparseRoIAlign and roi_align give torchvision's values and gradients on the CPU."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as torchvision_roi_align

from rsiseg.config import ModelConfig
from rsiseg.models.layers.roi_align import SparseRoIAlign, roi_align
from rsiseg.models.registry import build_model

LEVELS = ["0", "1", "2", "3"]
HEIGHT, WIDTH = 128, 96  # not square, so that a swapped axis shows


def fpn_features(dtype: torch.dtype = torch.float32, batch: int = 2, channels: int = 5,
                 size: tuple[int, int] = (HEIGHT, WIDTH)) -> OrderedDict:
    generator = torch.Generator().manual_seed(0)
    return OrderedDict((name, torch.randn(batch, channels, size[0] >> (level + 2), size[1] >> (level + 2),
                                          dtype=dtype, generator=generator, requires_grad=True))
                       for level, name in enumerate(LEVELS))


def awkward_boxes(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Boxes of all four levels (the two largest mostly off the image), a sub-pixel one, ones past every
    border and one far outside, on images 0 and 2; none on image 1."""
    first = torch.tensor([[3.0, 4.0, 20.0, 25.0], [-20.0, -20.0, 110.0, 140.0], [60.2, 60.7, 60.9, 61.1],
                          [-10.0, 100.0, 30.0, 140.0], [90.0, -5.0, 105.0, 9.0], [200.0, 200.0, 260.0, 250.0],
                          [10.0, 40.0, 90.0, 70.0], [-100.0, -80.0, 200.0, 210.0], [-200.0, -190.0, 300.0, 290.0]],
                         dtype=dtype)
    return [first, torch.zeros(0, 4, dtype=dtype), first[[6, 0]] + 1.5]


def pooled_and_gradients(pooler, features: OrderedDict, boxes: list[torch.Tensor], upstream: torch.Tensor | None):
    out = pooler(features, boxes, [(HEIGHT, WIDTH)] * len(boxes))
    upstream = torch.randn_like(out) if upstream is None else upstream
    return out, torch.autograd.grad(out, list(features.values()), upstream), upstream


@pytest.mark.parametrize(("output_size", "sampling_ratio"), [(7, 2), (14, 2), ((7, 5), 1), ((5, 3), 3)])
def test_sparse_roi_align_matches_torchvision_outputs_and_gradients(output_size, sampling_ratio):
    features, boxes = fpn_features(batch=3), awkward_boxes()
    expected, expected_grads, upstream = pooled_and_gradients(
        MultiScaleRoIAlign(LEVELS, output_size, sampling_ratio), features, boxes, None)
    got, grads, _ = pooled_and_gradients(SparseRoIAlign(LEVELS, output_size, sampling_ratio), features, boxes,
                                         upstream)
    assert got.shape == expected.shape == (11, 5, *((output_size,) * 2 if isinstance(output_size, int) else output_size))
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for level, (a, b) in enumerate(zip(expected_grads, grads)):
        assert a.abs().sum() > 0, f"level {level} received no gradient: the boxes do not cover every level"
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_sparse_roi_align_matches_torchvision_in_float64_and_passes_gradcheck():
    features = fpn_features(torch.float64, batch=3, channels=2)
    boxes = awkward_boxes(torch.float64)
    expected, expected_grads, upstream = pooled_and_gradients(MultiScaleRoIAlign(LEVELS, 3, 2), features, boxes, None)
    got, grads, _ = pooled_and_gradients(SparseRoIAlign(LEVELS, 3, 2), features, boxes, upstream)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    for a, b in zip(expected_grads, grads):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)
    small = fpn_features(torch.float64, batch=3, channels=2, size=(32, 24))
    pooler = SparseRoIAlign(LEVELS, 3, 2)

    def pool(*maps):
        return pooler(OrderedDict(zip(LEVELS, maps)), [b / 4 for b in boxes], [(32, 24)] * 3)

    assert torch.autograd.gradcheck(pool, tuple(small.values()))


def test_sparse_roi_align_is_deterministic_and_takes_channels_last_and_strided_gradients():
    features, boxes = fpn_features(batch=3), awkward_boxes()
    pooler = SparseRoIAlign(LEVELS, 7, 2)
    first, first_grads, upstream = pooled_and_gradients(pooler, features, boxes, None)
    again, again_grads, _ = pooled_and_gradients(pooler, features, boxes, upstream)
    assert torch.equal(first, again) and all(torch.equal(a, b) for a, b in zip(first_grads, again_grads))
    channels_last = OrderedDict((k, v.detach().to(memory_format=torch.channels_last).requires_grad_())
                                for k, v in features.items())
    strided = torch.randn(*upstream.shape[:-1], 2 * upstream.shape[-1])[..., ::2]  # not contiguous
    got, grads, _ = pooled_and_gradients(pooler, channels_last, boxes, strided)
    expected, expected_grads, _ = pooled_and_gradients(MultiScaleRoIAlign(LEVELS, 7, 2), features, boxes, strided)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(expected_grads, grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_sparse_roi_align_pools_nothing_from_boxes_that_are_not_finite_or_inverted():
    # (torchvision 0.29's CPU kernel crashes on boxes that are not finite; a diverging regression can make them)
    features = fpn_features()
    nan, inf = float("nan"), float("inf")
    bad = torch.tensor([[nan, 3.0, 20.0, 30.0], [2.0, 3.0, inf, 30.0], [-inf, -inf, inf, inf], [nan] * 4,
                        [10.0, 10.0, 5.0, 20.0]])  # the last one inverted: torchvision maps it to no level
    good = torch.tensor([[4.0, 4.0, 40.0, 44.0]])
    shapes = [(HEIGHT, WIDTH)] * 2
    got = SparseRoIAlign(LEVELS, 7, 2)(features, [torch.cat([bad, good]), good], shapes)
    assert torch.isfinite(got).all() and not got[:5].any()
    expected = MultiScaleRoIAlign(LEVELS, 7, 2)(features, [torch.cat([bad[4:], good]), good], shapes)
    torch.testing.assert_close(got[4:], expected, atol=1e-5, rtol=1e-5)


def test_sparse_roi_align_follows_torchvision_on_levels_that_are_not_consecutive():
    features = fpn_features(batch=3)
    maps = OrderedDict([("0", features["0"]), ("2", features["2"])])  # the mapper yields levels 0-2 for 2 maps
    boxes = awkward_boxes()
    expected = MultiScaleRoIAlign(["0", "2"], 7, 2)(maps, boxes, [(HEIGHT, WIDTH)] * 3)
    got = SparseRoIAlign(["0", "2"], 7, 2)(maps, boxes, [(HEIGHT, WIDTH)] * 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_roi_align_refuses_a_batch_index_outside_the_features():
    maps = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="RoI 1 has batch index 2.0, but the features hold 2 images"):
        roi_align(maps, torch.tensor([[0.0, 0, 0, 4, 4], [2.0, 0, 0, 4, 4]]), 2, 1.0, 2)
    with pytest.raises(ValueError, match="batch index -1.0"):
        roi_align(maps, torch.tensor([[-1.0, 0, 0, 4, 4]]), 2, 1.0, 2)


def test_sparse_roi_align_of_no_boxes_is_empty():
    features = fpn_features()
    out = SparseRoIAlign(LEVELS, 7, 2)(features, [torch.zeros(0, 4), torch.zeros(0, 4)], [(HEIGHT, WIDTH)] * 2)
    assert out.shape == (0, 5, 7, 7)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap over torchvision's op
def test_sparse_roi_align_leaves_what_it_does_not_cover_to_torchvision(monkeypatch):
    calls = []
    monkeypatch.setattr("rsiseg.models.layers.roi_align.sparse_roi_align", lambda *a, **k: calls.append(1))
    features, boxes = fpn_features(), awkward_boxes()[:2]
    shapes = [(HEIGHT, WIDTH)] * 2
    adaptive = SparseRoIAlign(LEVELS, 7, sampling_ratio=0)(features, boxes, shapes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = SparseRoIAlign(LEVELS, 7, 2)(features, boxes, shapes)
    with FlopCounterMode(display=False) as counter:  # it would read the sparse product as a huge dense matmul
        counted = SparseRoIAlign(LEVELS, 7, 2)(features, boxes, shapes)
    halves = OrderedDict((k, v.detach().half()) for k, v in features.items())
    half = SparseRoIAlign(LEVELS, 7, 2)(halves, [b.half() for b in boxes], shapes)
    mapped = torch.vmap(lambda maps: roi_align(maps[None], [boxes[0]], 7, 0.25, 2))(features["0"].detach())
    assert calls == [] and adaptive.shape == autocast.shape == counted.shape == half.shape == (9, 5, 7, 7)
    assert counter.get_total_flops() == 0 and mapped.shape == (2, 9, 5, 7, 7)
    SparseRoIAlign(LEVELS, 7, 2)(features, boxes, shapes)
    assert calls == [1]


@pytest.mark.parametrize("aligned", [False, True])
def test_single_level_roi_align_matches_torchvision(aligned):
    maps = fpn_features(batch=3)["0"]  # [3, 5, 32, 24]
    boxes = awkward_boxes()
    expected = torchvision_roi_align(maps, boxes, (9, 7), 0.25, 3, aligned)
    got = roi_align(maps, boxes, (9, 7), 0.25, 3, aligned)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(got, maps, upstream)[0],
                               torch.autograd.grad(expected, maps, upstream)[0], atol=1e-5, rtol=1e-5)
    rois = torch.cat([torch.full((len(b), 1), float(i)) for i, b in enumerate(boxes)])
    rois = torch.cat([rois, torch.cat(boxes)], 1)  # the [K, 5] form
    torch.testing.assert_close(roi_align(maps, rois, (9, 7), 0.25, 3, aligned), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["maskrcnn_r18_fpn", "cascade_maskrcnn_r18_prompt"])
def test_rcnn_models_pool_with_sparse_roi_align(name):
    model = build_model(ModelConfig(name=name, num_classes=2, fpn_channels=32))
    assert isinstance(model.roi_heads.box_roi_pool, SparseRoIAlign)
    assert isinstance(model.roi_heads.mask_roi_pool, SparseRoIAlign)
