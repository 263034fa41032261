"""Tests of rsiseg.inference.visualize: display conversion and instance overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rsiseg.inference.paste import paste_full
from rsiseg.inference.visualize import class_colors, draw_instances, save_overlay, to_display_rgb
from tests.inference.roi_predictions import roi_prediction

NAMES = ["plane", "ship", "small-vehicle"]


def _square_pred(size: int = 128, label: int = 2) -> dict:
    """One instance: a filled square mask at rows/cols 40..79 with its box."""
    masks = torch.zeros((1, 1, size, size))
    masks[0, 0, 40:80, 40:80] = 0.9
    return {
        "boxes": torch.tensor([[40.0, 40.0, 80.0, 80.0]]),
        "labels": torch.tensor([label]),
        "scores": torch.tensor([0.87]),
        "masks": masks,
    }


def _grey(size: int = 128) -> np.ndarray:
    return np.full((size, size, 3), 128, dtype=np.uint8)


def test_one_band_is_grey() -> None:
    image = torch.linspace(0, 1, 32 * 48).reshape(1, 32, 48)
    rgb = to_display_rgb(image)
    assert rgb.shape == (32, 48, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    assert rgb.min() == 0 and rgb.max() == 255


def test_three_bands_with_good_contrast_are_shown_as_is() -> None:
    image = torch.rand((3, 40, 30), generator=torch.Generator().manual_seed(0))
    rgb = to_display_rgb(image)
    expected = np.round(image.permute(1, 2, 0).numpy() * 255)
    assert rgb.shape == (40, 30, 3)
    assert np.abs(rgb.astype(int) - expected).max() <= 1


def test_more_than_three_bands_show_the_first_three() -> None:
    image = torch.rand((4, 20, 20), generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(to_display_rgb(image), to_display_rgb(image[:3]))


def test_uint8_hwc_array_passes_through() -> None:
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_display_rgb(image), image)


def test_dark_low_contrast_image_is_stretched() -> None:
    # Linear SAR: most backscatter tiny, values in [0, 0.05]; shown linearly it is black.
    sar = torch.rand((1, 64, 64), generator=torch.Generator().manual_seed(0)) * 0.05
    rgb = to_display_rgb(sar)
    assert np.percentile(rgb, 2) <= 10 and np.percentile(rgb, 98) >= 245
    dark_uint16 = np.random.default_rng(0).integers(0, 4096, (64, 64, 3), dtype=np.uint16)  # 12-bit data
    assert np.ptp(to_display_rgb(dark_uint16)) >= 200


def test_class_colors_are_distinct_and_deterministic() -> None:
    colors = class_colors(40)
    assert len(colors) == 40 and len(set(colors)) == 40
    assert colors == class_colors(40) and colors[:3] == class_colors(3)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colors)


def test_mask_pixels_move_towards_class_color_far_pixels_unchanged() -> None:
    image = _grey()
    out = draw_instances(image, _square_pred(), NAMES, show_legend=False)
    assert out.shape == image.shape and out.dtype == np.uint8
    color = np.array(class_colors(len(NAMES))[1], dtype=float)  # label 2
    inside_before = np.linalg.norm(image[60, 60] - color)
    inside_after = np.linalg.norm(out[60, 60] - color)
    assert inside_after < 0.7 * inside_before
    np.testing.assert_array_equal(out[100:, :30], image[100:, :30])  # far from mask, box and tag
    np.testing.assert_array_equal(out[:30, 100:], image[:30, 100:])
    assert np.array_equal(image, _grey())  # input untouched


def test_legend_drawn_in_top_right_corner_when_on() -> None:
    image = _grey()
    off = draw_instances(image, _square_pred(), NAMES, show_legend=False)
    on = draw_instances(image, _square_pred(), NAMES, show_legend=True)
    corner = (slice(0, 16), slice(100, 128))
    assert np.array_equal(off[corner], image[corner])
    assert np.abs(on[corner].astype(int) - image[corner]).sum(axis=2).astype(bool).mean() > 0.3


def test_score_threshold_hides_instances_and_box_only_works() -> None:
    image = _grey()
    pred = _square_pred()
    np.testing.assert_array_equal(draw_instances(image, pred, NAMES, score_threshold=0.9, note_hidden=False), image)
    del pred["masks"]
    out = draw_instances(image, pred, NAMES, show_legend=False)
    assert not np.array_equal(out[40, 40:80], image[40, 40:80])  # box outline drawn
    np.testing.assert_array_equal(out[60, 60], image[60, 60])  # no mask fill


def _changed_rows(out: np.ndarray, image: np.ndarray) -> np.ndarray:
    return np.nonzero((out != image).any(axis=(1, 2)))[0]


@pytest.mark.parametrize("size", [128, 1024])
def test_hidden_detections_are_noted_bottom_left_in_the_legend_font(size: int) -> None:
    image = _grey(size)
    pred = _square_pred(size)
    out = draw_instances(image, pred, NAMES, score_threshold=0.9)
    rows, cols = _changed_rows(out, image), np.nonzero((out != image).any(axis=(0, 2)))[0]
    assert len(rows) and rows.min() > size * 3 // 4 and cols.min() < size // 16  # only the bottom-left note
    # Same font as the legend: the note panel is as tall as a one-class legend panel.
    legend = draw_instances(image, pred, NAMES, score_threshold=0.0)
    legend_rows = np.nonzero((legend[:, -6] != image[:, -6]).any(axis=1))[0]  # near the right edge: the legend only
    assert abs(len(rows) - len(legend_rows)) <= 4
    assert len(rows) > (18 if size == 1024 else 8)  # scales with the image
    assert np.array_equal(draw_instances(image, pred, NAMES, score_threshold=0.5), legend)  # nothing hidden


def test_note_text_and_ground_truth_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    import rsiseg.inference.visualize as visualize

    notes: list[str] = []
    monkeypatch.setattr(visualize, "_draw_note", lambda canvas, text, style, occupied: notes.append(text))
    pred = {"boxes": torch.tensor([[1.0, 1, 9, 9]] * 13), "labels": torch.ones(13, dtype=torch.int64),
            "scores": torch.tensor([0.9] + [0.1] * 12)}
    draw_instances(_grey(), pred, NAMES, score_threshold=0.3)
    assert notes == ["12 below score 0.3"]
    draw_instances(_grey(), {"boxes": pred["boxes"], "labels": pred["labels"]}, NAMES, score_threshold=0.3)
    assert notes == ["12 below score 0.3"]  # no scores (ground truth): nothing is hidden


def test_dense_scene_and_numpy_inputs() -> None:
    rng = np.random.default_rng(0)
    n, size = 300, 200
    xy = rng.uniform(0, size - 20, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(3, 20, (n, 2))], axis=1).astype(np.float32)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        masks[i, y1:y2, x1:x2] = 1
    pred = {"boxes": boxes, "labels": rng.integers(1, 4, n), "scores": rng.uniform(0, 1, n), "masks": masks}
    image = torch.rand((4, size, size), generator=torch.Generator().manual_seed(0))
    out = draw_instances(image, pred, NAMES)  # non-RGB input goes through to_display_rgb
    covered = masks.any(axis=0)
    changed = (out != to_display_rgb(image)).any(axis=2)
    assert changed[covered].mean() > 0.99


def test_mask_size_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="image"):
        draw_instances(_grey(64), _square_pred(128), NAMES)


def _roi_pred(n: int, height: int, width: int, seed: int = 0) -> dict:
    return roi_prediction(n, height, width, classes=3, max_half=25.0, seed=seed)


@pytest.mark.parametrize("as_numpy", [False, True])
def test_roi_mask_overlay_equals_overlay_of_pasted_full_masks(as_numpy: bool) -> None:
    # Pixel-identical: both paths threshold the same pasted values, and the windows hold all of them.
    height, width = 96, 144
    pred = _roi_pred(120, height, width)
    full = {k: v for k, v in pred.items() if k not in ("roi_masks", "image_size")}
    full["masks"] = paste_full(pred["roi_masks"], pred["boxes"], (height, width))[:, None]
    if as_numpy:
        pred = {k: v.numpy() for k, v in pred.items()}
        pred["roi_masks"] = pred["roi_masks"][:, None]  # [N, 1, M, M] as torchvision returns them
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    for kwargs in ({}, {"score_threshold": 0.4, "mask_threshold": 0.7, "show_legend": False}):
        from_rois = draw_instances(image, pred, NAMES, **kwargs)
        np.testing.assert_array_equal(from_rois, draw_instances(image, full, NAMES, **kwargs))
    assert (from_rois != image).any(axis=2).mean() > 0.2


def test_roi_masks_image_size_mismatch_raises() -> None:
    pred = _roi_pred(3, 64, 80)
    with pytest.raises(ValueError, match="image_size"):
        draw_instances(_grey(64), pred, NAMES)
    del pred["image_size"]  # optional for overlays: the image gives the size
    assert draw_instances(_grey(64), pred, NAMES).shape == (64, 64, 3)
    pred["roi_masks"] = pred["roi_masks"][:2]
    with pytest.raises(ValueError, match="roi_masks"):
        draw_instances(_grey(64), pred, NAMES)


def test_save_overlay_writes_png_of_same_size(tmp_path) -> None:
    path = tmp_path / "figs" / "overlay.png"
    save_overlay(path, _grey(), _square_pred(), NAMES, score_threshold=0.5)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (128, 128) and png.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(png), draw_instances(_grey(), _square_pred(), NAMES))
