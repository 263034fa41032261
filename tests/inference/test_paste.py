"""Tests of rsiseg.inference.paste: windowed pasting equals torchvision's full-size paste."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from rsiseg.inference.paste import iter_windows, paste_full, paste_window, roi_masks_to_rles
from rsiseg.structures import masks_to_rles

HEIGHT, WIDTH = 37, 53  # non-square, to catch H/W swaps


def _detections(n: int = 60, m: int = 28, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``[N, M, M]`` probabilities and awkward boxes.

    Boxes: random non-integer ones (many overhanging a border), tiny ones (< 2 px, one of
    zero size), ones exactly touching the borders, and one larger than the image.
    """
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand((n, m, m), generator=gen)
    # Centres inside the image: torchvision's paste fails on boxes entirely outside it.
    cx = torch.rand(n, generator=gen) * WIDTH
    cy = torch.rand(n, generator=gen) * HEIGHT
    w = torch.rand(n, generator=gen) * 40
    h = torch.rand(n, generator=gen) * 40
    w[:8] = torch.rand(8, generator=gen) * 2  # tiny
    h[:8] = torch.rand(8, generator=gen) * 2
    w[0] = h[0] = 0.0
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
    fixed = torch.tensor(
        [
            [0.0, 0.0, WIDTH, HEIGHT],  # the whole image
            [0.0, 0.0, WIDTH - 1.0, HEIGHT - 1.0],  # touching all borders
            [-20.5, -15.2, WIDTH + 12.7, HEIGHT + 9.1],  # larger than the image
            [WIDTH - 3.3, 5.0, WIDTH + 0.4, 9.9],  # overhanging right
            [3.0, HEIGHT - 0.6, 4.2, HEIGHT + 0.1],  # tiny, overhanging bottom
            [-0.4, -0.9, 0.3, 0.2],  # tiny, at the origin
        ]
    )
    boxes[8 : 8 + len(fixed)] = fixed
    return probs, boxes


def _reference(probs: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """torchvision's full-size paste, ``float32 [N, H, W]``."""
    return paste_masks_in_image(probs[:, None], boxes, (HEIGHT, WIDTH))[:, 0]


@pytest.mark.parametrize("m", [28, 14])
def test_windows_equal_torchvision_paste(m: int) -> None:
    probs, boxes = _detections(m=m)
    reference = _reference(probs, boxes)
    for i, (local, x0, y0) in enumerate(iter_windows(probs, boxes, (HEIGHT, WIDTH))):
        h, w = local.shape
        assert local.dtype == torch.float32
        assert 0 <= x0 and x0 + w <= WIDTH and 0 <= y0 and y0 + h <= HEIGHT
        inside = reference[i, y0 : y0 + h, x0 : x0 + w]
        torch.testing.assert_close(local, inside, atol=1e-5, rtol=0)
        assert torch.equal(local > 0.5, inside > 0.5)
        outside = reference[i].clone()
        outside[y0 : y0 + h, x0 : x0 + w] = 0
        assert not outside.any(), f"detection {i} has mass outside its window"


def test_paste_full_equals_torchvision_and_accepts_n1mm() -> None:
    probs, boxes = _detections(seed=1)
    reference = _reference(probs, boxes)
    full = paste_full(probs, boxes, (HEIGHT, WIDTH))
    assert full.shape == (len(probs), HEIGHT, WIDTH) and full.dtype == torch.float32
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=0)
    assert torch.equal(full > 0.5, reference > 0.5)
    assert torch.equal(paste_full(probs[:, None], boxes, torch.tensor([HEIGHT, WIDTH])), full)


@pytest.mark.parametrize("threshold", [0.5, 0.0, 0.8])
def test_rles_equal_encoding_of_full_size_masks(threshold: float) -> None:
    probs, boxes = _detections(seed=2)
    binary = (_reference(probs, boxes) > threshold).numpy().astype(np.uint8)
    assert roi_masks_to_rles(probs, boxes, (HEIGHT, WIDTH), threshold) == masks_to_rles(binary)


def test_single_window_matches_batch() -> None:
    probs, boxes = _detections(n=16, seed=3)
    batch = list(iter_windows(probs, boxes, (HEIGHT, WIDTH)))
    for i in (0, 5, 10, 15):
        local, x0, y0 = paste_window(probs[i], boxes[i], (HEIGHT, WIDTH))
        assert (x0, y0) == batch[i][1:] and torch.equal(local, batch[i][0])


def test_box_outside_image_gives_empty_window_and_empty_rle() -> None:
    probs = torch.ones((2, 28, 28))
    boxes = torch.tensor([[-30.0, 2.0, -10.0, 9.0], [WIDTH + 5.0, HEIGHT + 1.0, WIDTH + 20.0, HEIGHT + 8.0]])
    for local, x0, y0 in iter_windows(probs, boxes, (HEIGHT, WIDTH)):
        assert local.numel() == 0 and 0 <= x0 <= WIDTH and 0 <= y0 <= HEIGHT
    assert not paste_full(probs, boxes, (HEIGHT, WIDTH)).any()
    empty = masks_to_rles(np.zeros((2, HEIGHT, WIDTH), np.uint8))
    assert roi_masks_to_rles(probs, boxes, (HEIGHT, WIDTH)) == empty


def test_no_detections_and_bad_inputs() -> None:
    none = torch.zeros((0, 28, 28))
    assert roi_masks_to_rles(none, torch.zeros((0, 4)), (HEIGHT, WIDTH)) == []
    assert paste_full(none, torch.zeros(0), (HEIGHT, WIDTH)).shape == (0, HEIGHT, WIDTH)
    with pytest.raises(ValueError, match="disagree"):
        paste_full(torch.zeros((3, 28, 28)), torch.zeros((2, 4)), (HEIGHT, WIDTH))
    with pytest.raises(ValueError, match="threshold"):
        roi_masks_to_rles(torch.zeros((1, 28, 28)), torch.zeros((1, 4)), (HEIGHT, WIDTH), threshold=-0.1)
