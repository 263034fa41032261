"""Tests of the synthetic aerial dataset generator (rsiseg.data.synthetic)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from rsiseg.data.synthetic import CATEGORIES, SynthSpec, generate_scene, split_indices, write_synthetic_dataset
from rsiseg.structures import segmentation_to_mask


def _scenes(n: int, size: int = 256, seed: int = 11, **kwargs) -> list[tuple[np.ndarray, list[dict]]]:
    return [generate_scene(np.random.default_rng([seed, k]), size, **kwargs) for k in range(n)]


def _load(paths: dict[str, Path]) -> tuple[dict, dict]:
    return json.loads(paths["train"].read_text()), json.loads(paths["val"].read_text())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("synth")
    return write_synthetic_dataset(out, SynthSpec(images=8, size=256, seed=3), progress=False)


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    runs = {name: write_synthetic_dataset(tmp_path / name, SynthSpec(images=4, size=128, seed=seed), progress=False)
            for name, seed in (("a", 5), ("b", 5), ("c", 6))}
    for split in ("train", "val"):
        assert runs["a"][split].read_bytes() == runs["b"][split].read_bytes()
    pngs = sorted(p.name for p in runs["a"]["images"].glob("*.png"))
    assert pngs == [f"synth_{k:05d}.png" for k in range(4)]
    for name in pngs:
        assert (runs["a"]["images"] / name).read_bytes() == (runs["b"]["images"] / name).read_bytes()
    train_a, train_c = runs["a"]["train"].read_text(), runs["c"]["train"].read_text()
    assert train_a != train_c
    pixels_a = np.asarray(Image.open(runs["a"]["images"] / pngs[0]))
    pixels_c = np.asarray(Image.open(runs["c"]["images"] / pngs[0]))
    assert np.abs(pixels_a.astype(int) - pixels_c.astype(int)).mean() > 5


def test_image_k_does_not_depend_on_the_number_of_images(tmp_path: Path) -> None:
    small = write_synthetic_dataset(tmp_path / "small", SynthSpec(images=2, size=96, seed=1), progress=False)
    large = write_synthetic_dataset(tmp_path / "large", SynthSpec(images=5, size=96, seed=1), progress=False)
    for name in ("synth_00000.png", "synth_00001.png"):
        assert (small["images"] / name).read_bytes() == (large["images"] / name).read_bytes()


def test_coco_files_are_valid(dataset: dict[str, Path]) -> None:
    train, val = _load(dataset)
    known = {c["id"] for c in CATEGORIES}
    assert known == {1, 2, 3, 4, 5} and all(c["supercategory"] for c in CATEGORIES)
    images = train["images"] + val["images"]
    anns = train["annotations"] + val["annotations"]
    assert len({im["id"] for im in images}) == len(images) == 8
    assert len({a["id"] for a in anns}) == len(anns) > 0
    by_id = {im["id"]: im for im in images}
    for coco in (train, val):
        assert coco["categories"] == CATEGORIES
        assert {a["image_id"] for a in coco["annotations"]} <= {im["id"] for im in coco["images"]}
    for im in images:
        with Image.open(dataset["images"] / im["file_name"]) as img:
            assert img.size == (im["width"], im["height"]) == (256, 256) and img.mode == "RGB"
    for a in anns:
        im = by_id[a["image_id"]]
        assert a["category_id"] in known and a["iscrowd"] == 0
        (poly,) = a["segmentation"]
        assert len(poly) >= 6 and len(poly) % 2 == 0 and all(round(v, 2) == v for v in poly)
        xs, ys = np.array(poly[0::2]), np.array(poly[1::2])
        shoelace = 0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1)))
        assert a["area"] > 0 and a["area"] == pytest.approx(shoelace, abs=0.01)
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= im["width"] + 1e-6 and y + h <= im["height"] + 1e-6
        assert [x, y, x + w, y + h] == pytest.approx([xs.min(), ys.min(), xs.max(), ys.max()], abs=0.011)


def test_most_instances_are_small_and_counts_are_realistic() -> None:
    scenes = _scenes(24)
    counts = [len(inst) for _, inst in scenes]
    boxes = [np.ptp(np.reshape(i["polygon"], (-1, 2)), axis=0) for _, inst in scenes for i in inst]
    small = np.mean([w * h < 32 * 32 for w, h in boxes])
    assert small > 0.5, f"only {small:.0%} of instances are small"
    assert 10 <= np.mean(counts) <= 40
    assert {i["category_id"] for _, inst in scenes for i in inst} == {1, 2, 3, 4, 5}
    for image, inst in scenes:
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        for i in inst:
            pts = np.reshape(i["polygon"], (-1, 2))
            assert pts.min() >= 0 and pts.max() <= 256


def test_object_count_scales_with_image_area() -> None:
    per_px = {size: np.mean([len(inst) for _, inst in _scenes(12, size, seed=2)]) / size**2 for size in (128, 256)}
    assert 0.5 < per_px[128] / per_px[256] < 2.0


def test_instances_do_not_overlap() -> None:
    for image, inst in _scenes(6, seed=4):
        masks = [segmentation_to_mask([i["polygon"]], 256, 256) for i in inst]
        if masks:
            assert np.stack(masks).sum(0).max() <= 1


@pytest.mark.parametrize(
    ("images", "fraction", "n_val"), [(1, 0.25, 0), (2, 0.25, 1), (2, 0.0, 1), (8, 0.25, 2), (10, 0.5, 5)]
)
def test_split_sizes(tmp_path: Path, images: int, fraction: float, n_val: int) -> None:
    spec = SynthSpec(images=images, size=48, seed=9, val_fraction=fraction)
    train, val = _load(write_synthetic_dataset(tmp_path, spec, progress=False))
    assert len(val["images"]) == n_val and len(train["images"]) == images - n_val
    assert sorted(im["id"] for im in train["images"] + val["images"]) == list(range(1, images + 1))


def test_split_is_deterministic_and_depends_on_seed() -> None:
    assert split_indices(40, 0.25, 0) == split_indices(40, 0.25, 0)
    assert len(split_indices(40, 0.25, 0)) == 10
    assert split_indices(40, 0.25, 0) != split_indices(40, 0.25, 1)


def test_empty_images_are_kept(tmp_path: Path) -> None:
    spec = SynthSpec(images=3, size=64, seed=0, empty_fraction=1.0)
    train, val = _load(write_synthetic_dataset(tmp_path, spec, progress=False))
    assert len(train["images"]) + len(val["images"]) == 3
    assert train["annotations"] == [] and val["annotations"] == []
    # At the default rate some scenes are empty too, and they still have an image.
    assert any(not inst for _, inst in _scenes(60, size=64, seed=1))


def test_masks_cover_the_drawn_objects() -> None:
    contrasts = []
    for image, inst in _scenes(4, seed=8):
        pixels = image.astype(np.float32)
        for i in inst:
            mask = segmentation_to_mask([i["polygon"]], 256, 256)
            assert mask.sum() > 0
            ring = cv2.dilate(mask, np.ones((5, 5), np.uint8)) - cv2.dilate(mask, np.ones((3, 3), np.uint8))
            contrasts.append(np.linalg.norm(pixels[mask > 0].mean(0) - pixels[ring > 0].mean(0)))
    # Objects are bright/coloured against asphalt, soil or water: a mask shifted off its
    # object would average ground on both sides and give a small contrast.
    assert len(contrasts) > 20
    assert np.median(contrasts) > 60 and np.percentile(contrasts, 5) > 20


def test_bad_spec_raises() -> None:
    for bad in ({"seed": -1}, {"images": 0}, {"size": 16}, {"val_fraction": 1.0}, {"object_scale": 0}):
        with pytest.raises(ValueError):
            SynthSpec(**bad)


def test_the_sar_style_shows_the_same_scenes_as_speckled_grey(tmp_path: Path) -> None:
    optical = write_synthetic_dataset(tmp_path / "optical", SynthSpec(images=3, size=64, seed=5), progress=False)
    sar = write_synthetic_dataset(tmp_path / "sar", SynthSpec(images=3, size=64, seed=5, style="sar"), progress=False)
    assert _load(optical) == _load(sar)  # the same objects: only the look changes
    name = json.loads(sar["train"].read_text())["images"][0]["file_name"]
    grey = np.asarray(Image.open(sar["images"] / name))
    assert grey.shape == (64, 64, 3) and (grey == grey[:, :, :1]).all()  # three equal bands
    rgb = np.asarray(Image.open(optical["images"] / name)).astype(np.float32).mean(axis=2)
    assert np.corrcoef(rgb.ravel(), grey[:, :, 0].ravel())[0, 1] > 0.2  # the scene shows through the speckle
    with pytest.raises(ValueError, match="style"):
        SynthSpec(style="infrared")
