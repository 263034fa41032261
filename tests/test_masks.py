"""InstanceMasks against the full-size reference, on random polygons (multi-part) and RLE (with holes)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from rsiseg.masks import InstanceMasks
from rsiseg.structures import mask_to_rle, masks_to_boxes, segmentation_to_mask

H, W = 120, 160


def random_polygon(rng: np.random.Generator, radius: tuple[float, float] = (6, 30)) -> list[float]:
    n = int(rng.integers(3, 12))
    centre = rng.uniform([-10, -10], [W + 10, H + 10])  # some overhang the border
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(*radius) * rng.uniform(0.5, 1.0, n)
    return np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1).ravel().tolist()


def random_rle(rng: np.random.Generator) -> dict:
    """A ring (a hole inside) or two blobs: shapes COCO polygons cannot express."""
    mask = np.zeros((H, W), np.uint8)
    cx, cy, r = rng.integers(20, W - 20), rng.integers(20, H - 20), int(rng.integers(8, 20))
    cv2.circle(mask, (int(cx), int(cy)), r, 1, -1)
    cv2.circle(mask, (int(cx), int(cy)), r // 2, 0, -1)
    if rng.random() < 0.5:
        x, y = rng.integers(0, W - 10), rng.integers(0, H - 10)
        mask[y: y + 8, x: x + 9] = 1
    return mask_to_rle(mask)


@pytest.fixture(scope="module")
def sample() -> tuple[InstanceMasks, np.ndarray]:
    rng = np.random.default_rng(0)
    segms = []
    for i in range(60):
        if i % 3 == 2:
            segms.append(random_rle(rng))
        else:  # one or two parts
            segms.append([random_polygon(rng) for _ in range(1 + int(i % 4 == 1))])
    full = np.stack([segmentation_to_mask(s, H, W) for s in segms])
    return InstanceMasks.from_coco(segms, H, W), full


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-instance IoU of ``[N, H, W]`` masks; 1 where both are empty."""
    inter = (a.astype(bool) & b.astype(bool)).reshape(len(a), -1).sum(1)
    union = (a.astype(bool) | b.astype(bool)).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def test_from_coco_matches_full_decode(sample) -> None:
    masks, full = sample
    assert np.array_equal(masks.to_full().numpy(), full)
    assert torch.equal(masks.areas(), torch.from_numpy(full.reshape(len(full), -1).sum(1)).long())
    assert torch.equal(masks.boxes(), masks_to_boxes(torch.from_numpy(full)))


def test_memory_grows_with_objects_not_image_area(sample) -> None:
    masks, full = sample
    assert masks.nbytes() < full.nbytes / 20


@pytest.mark.parametrize("op", ["hflip", "vflip", "rot90_1", "rot90_2", "rot90_3"])
def test_flips_and_rotations(sample, op: str) -> None:
    masks, full = sample
    if op == "hflip":
        out, ref = masks.hflip(), full[:, :, ::-1]
    elif op == "vflip":
        out, ref = masks.vflip(), full[:, ::-1]
    else:
        k = int(op[-1])
        out, ref = masks.rot90(k), np.rot90(full, k, axes=(1, 2))
    assert out.image_size == ref.shape[1:]
    got = out.to_full().numpy()
    assert iou(got, ref).mean() >= 0.99
    assert iou(got, ref).min() >= 0.9
    # Bitmaps (RLE sources) are transformed pixel-exactly.
    rle = [i for i in range(len(full)) if i % 3 == 2]
    assert np.array_equal(got[rle], ref[rle])
    assert torch.allclose(out.boxes(), masks_to_boxes(torch.from_numpy(np.ascontiguousarray(got))))


@pytest.mark.parametrize("scale", [0.75, 1.6])
def test_resize(sample, scale: float) -> None:
    masks, full = sample
    h, w = round(H * scale), round(W * scale)
    out = masks.resize(h, w)
    got = out.to_full().numpy()
    assert out.image_size == (h, w)
    # Bitmaps: nearest neighbour at pixel centres, as on the full masks (cv2's INTER_NEAREST_EXACT,
    # without its fixed-point rounding of exact ties).
    src_y = np.floor((np.arange(h) + 0.5) * H / h).astype(int)
    src_x = np.floor((np.arange(w) + 0.5) * W / w).astype(int)
    resampled = full[:, src_y][:, :, src_x]
    rle = [i for i in range(len(full)) if i % 3 == 2]
    assert np.array_equal(got[rle], resampled[rle])
    # Polygons: the scaled geometry rasterised at full size, exactly; and close to the resampled raster.
    poly = [i for i in range(len(full)) if i % 3 != 2]
    for i in poly:
        rings = [(r * (w / W, h / H)).ravel().tolist() for r in masks.instances[i].rings]
        assert np.array_equal(got[i], segmentation_to_mask(rings, h, w))
    big = [i for i in poly if resampled[i].sum() >= 200]
    assert iou(got[big], resampled[big]).mean() >= 0.9  # resampling a raster loses boundary pixels


def test_crop(sample) -> None:
    masks, full = sample
    window = (30, 20, 130, 100)
    out = masks.crop(window)
    ref = full[:, 20:100, 30:130]
    assert out.image_size == (80, 100)
    assert np.array_equal(out.to_full().numpy(), ref)
    assert torch.equal(out.boxes(), masks_to_boxes(torch.from_numpy(np.ascontiguousarray(ref))))
    with pytest.raises(ValueError, match="crop window"):
        masks.crop((0, 0, W + 1, H))


def test_crop_and_resize_equals_roi_align_of_full_masks(sample) -> None:
    masks, full = sample
    rng = np.random.default_rng(1)
    nonempty = np.flatnonzero(full.reshape(len(full), -1).any(1))
    idx = torch.as_tensor(rng.choice(nonempty, 80))
    gt = masks.boxes()[idx]
    jitter = torch.as_tensor(rng.normal(0, 3, (80, 4)), dtype=torch.float32)
    rois = (gt + jitter).clamp(min=0)
    rois[:, 2:] = torch.maximum(rois[:, 2:], rois[:, :2] + 1)
    rois[:, 0::2], rois[:, 1::2] = rois[:, 0::2].clamp(max=W), rois[:, 1::2].clamp(max=H)
    got = masks.crop_and_resize(rois, idx, 28)
    ref = roi_align(torch.from_numpy(full)[idx, None].float(), torch.cat([torch.arange(80)[:, None], rois], 1), 28, 1.0)
    assert got.shape == (80, 28, 28)
    assert torch.allclose(got, ref[:, 0], atol=1e-4)  # shifted coordinates round differently
    assert iou((got >= 0.5).numpy(), (ref[:, 0] >= 0.5).numpy()).min() >= 0.99


def test_transforms_compose_with_crop_and_resize(sample) -> None:
    masks, full = sample
    out = masks.hflip().rot90(1).crop((10, 10, 100, 150))
    ref = np.rot90(full[:, :, ::-1], 1, axes=(1, 2))[:, 10:150, 10:100]
    rle = [i for i in range(len(full)) if i % 3 == 2 and ref[i].any()]
    rois = out.boxes()[rle]
    got = out.crop_and_resize(rois, rle, 14)
    want = roi_align(torch.from_numpy(np.ascontiguousarray(ref[rle]))[:, None].float(),
                     torch.cat([torch.arange(len(rle))[:, None].float(), rois], 1), 14, 1.0)[:, 0]
    assert torch.allclose(got, want, atol=1e-4)


def test_indexing_and_coco_round_trip(sample) -> None:
    masks, full = sample
    keep = masks.areas() > 0
    sub = masks[keep]
    assert len(sub) == int(keep.sum())
    assert np.array_equal(sub.to_full().numpy(), full[keep.numpy()])
    again = InstanceMasks.from_coco([sub.to_coco(i) for i in range(len(sub))], H, W)
    assert iou(again.to_full().numpy(), full[keep.numpy()]).min() >= 0.95  # polygons are clipped to the image


def test_from_boxes_and_from_masks() -> None:
    boxes = InstanceMasks.from_boxes([[2.5, 3, 10, 8], [0, 0, 0.2, 0.2]], 20, 20)
    assert torch.equal(boxes.boxes(), torch.tensor([[2.0, 3, 10, 8], [0, 0, 1, 1]]))
    full = np.zeros((2, 20, 20), np.uint8)
    full[0, 5:9, 4:6] = 1
    from_full = InstanceMasks.from_masks(full)
    assert np.array_equal(from_full.to_full().numpy(), full)
    assert from_full.areas().tolist() == [8, 0]
