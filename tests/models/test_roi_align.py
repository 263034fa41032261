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


def fpn_features(dtype: torch.dtype = torch.float32, batch: int = 2, channels: int = 5,
                 size: int = 128) -> OrderedDict:
    generator = torch.Generator().manual_seed(0)
    return OrderedDict((name, torch.randn(batch, channels, size >> (level + 2), size >> (level + 2), dtype=dtype,
                                          generator=generator, requires_grad=True))
                       for level, name in enumerate(LEVELS))


def awkward_boxes(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Boxes of all four levels (the two largest mostly off the image), a sub-pixel one, ones past every border
    and one far outside; none on image 2."""
    first = torch.tensor([[3.0, 4.0, 20.0, 25.0], [0.0, 0.0, 128.0, 128.0], [60.2, 60.7, 60.9, 61.1],
                          [-10.0, 100.0, 30.0, 140.0], [120.0, -5.0, 135.0, 9.0], [200.0, 200.0, 260.0, 250.0],
                          [10.0, 40.0, 90.0, 70.0], [-100.0, -80.0, 200.0, 210.0], [-200.0, -190.0, 300.0, 290.0]],
                         dtype=dtype)
    return [first, torch.zeros(0, 4, dtype=dtype), first[[6, 0]] + 1.5]


def pool_both(output_size: int, features: OrderedDict, boxes: list[torch.Tensor]):
    shapes = [(128, 128)] * len(boxes)
    reference = MultiScaleRoIAlign(LEVELS, output_size, 2)(features, boxes, shapes)
    sparse = SparseRoIAlign(LEVELS, output_size, 2)(features, boxes, shapes)
    return reference, sparse


@pytest.mark.parametrize("output_size", [7, 14])
def test_sparse_roi_align_matches_torchvision_outputs_and_gradients(output_size):
    features = fpn_features(batch=3)
    reference, sparse = pool_both(output_size, features, awkward_boxes())
    assert sparse.shape == reference.shape == (11, 5, output_size, output_size)
    torch.testing.assert_close(sparse, reference, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, list(features.values()), upstream)
    got = torch.autograd.grad(sparse, list(features.values()), upstream)
    for level, (a, b) in enumerate(zip(expected, got)):
        assert a.abs().sum() > 0, f"level {level} received no gradient: the boxes do not cover every level"
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_sparse_roi_align_passes_gradcheck_in_float64():
    features = fpn_features(torch.float64, batch=3, channels=2, size=32)
    boxes = [b / 4 for b in awkward_boxes(torch.float64)]
    pooler = SparseRoIAlign(LEVELS, 3, 2)

    def pool(*maps):
        return pooler(OrderedDict(zip(LEVELS, maps)), boxes, [(32, 32)] * 3)

    assert torch.autograd.gradcheck(pool, tuple(features.values()))


def test_sparse_roi_align_pools_nothing_from_boxes_that_are_not_finite():
    # (torchvision 0.29's CPU kernel crashes on such boxes; a diverging regression can make them)
    features = fpn_features()
    nan, inf = float("nan"), float("inf")
    bad = torch.tensor([[nan, 3.0, 20.0, 30.0], [2.0, 3.0, inf, 30.0], [-inf, -inf, inf, inf], [nan] * 4])
    good = torch.tensor([[4.0, 4.0, 40.0, 44.0]])
    shapes = [(128, 128)] * 2
    got = SparseRoIAlign(LEVELS, 7, 2)(features, [torch.cat([bad, good]), good], shapes)
    assert torch.isfinite(got).all() and not got[:4].any()
    expected = MultiScaleRoIAlign(LEVELS, 7, 2)(features, [good, good], shapes)
    torch.testing.assert_close(got[4:], expected, atol=1e-5, rtol=1e-5)


def test_sparse_roi_align_of_no_boxes_is_empty():
    features = fpn_features()
    out = SparseRoIAlign(LEVELS, 7, 2)(features, [torch.zeros(0, 4), torch.zeros(0, 4)], [(128, 128)] * 2)
    assert out.shape == (0, 5, 7, 7)


def test_sparse_roi_align_leaves_what_it_does_not_cover_to_torchvision(monkeypatch):
    calls = []
    monkeypatch.setattr("rsiseg.models.layers.roi_align.sparse_roi_align", lambda *a, **k: calls.append(1))
    features, boxes = fpn_features(), awkward_boxes()[:2]
    adaptive = SparseRoIAlign(LEVELS, 7, sampling_ratio=0)(features, boxes, [(128, 128)] * 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = SparseRoIAlign(LEVELS, 7, 2)(features, boxes, [(128, 128)] * 2)
    with FlopCounterMode(display=False) as counter:  # it would read the sparse product as a huge dense matmul
        counted = SparseRoIAlign(LEVELS, 7, 2)(features, boxes, [(128, 128)] * 2)
    assert calls == [] and adaptive.shape == autocast.shape == counted.shape == (9, 5, 7, 7)
    assert counter.get_total_flops() == 0
    SparseRoIAlign(LEVELS, 7, 2)(features, boxes, [(128, 128)] * 2)
    assert calls == [1]


@pytest.mark.parametrize("name", ["maskrcnn_r18_fpn", "cascade_maskrcnn_r18_prompt"])
def test_rcnn_models_pool_with_sparse_roi_align(name):
    model = build_model(ModelConfig(name=name, num_classes=2, fpn_channels=32))
    assert isinstance(model.roi_heads.box_roi_pool, SparseRoIAlign)
    assert isinstance(model.roi_heads.mask_roi_pool, SparseRoIAlign)


@pytest.mark.parametrize("aligned", [False, True])
def test_single_level_roi_align_matches_torchvision(aligned):
    maps = fpn_features(batch=3)["0"]  # [3, 5, 32, 32]
    boxes = awkward_boxes()
    expected = torchvision_roi_align(maps, boxes, 9, 0.25, 2, aligned)
    got = roi_align(maps, boxes, 9, 0.25, 2, aligned)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(got, maps, upstream)[0],
                               torch.autograd.grad(expected, maps, upstream)[0], atol=1e-5, rtol=1e-5)
    rois = torch.cat([torch.full((len(b), 1), float(i)) for i, b in enumerate(boxes)])
    rois = torch.cat([rois, torch.cat(boxes)], 1)  # the [K, 5] form
    torch.testing.assert_close(roi_align(maps, rois, (9, 9), 0.25, 2, aligned), expected, atol=1e-5, rtol=1e-5)
