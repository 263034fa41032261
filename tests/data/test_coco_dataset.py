"""COCO dataset: formats, band handling, augmentation, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from rsiseg.config import DataConfig
from rsiseg.data.coco import CocoInstanceDataset
from rsiseg.data.coco_index import DataError
from rsiseg.data.transforms import build_train_transforms
from rsiseg.masks import InstanceMasks
from rsiseg.structures import mask_to_rle, segmentation_to_mask

SQUARE = [10.0, 10.0, 30.0, 10.0, 30.0, 25.0, 10.0, 25.0]  # 20 x 15 px


def write_dataset(root: Path, annotations: list[dict] | None = None, image_format: str = "png") -> Path:
    """Two 64x48 RGB images (the second without instances) and a COCO JSON; returns the JSON path."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "img" / f"{name}.{image_format}")
    rle_mask = np.zeros((48, 64), np.uint8)
    rle_mask[30:40, 40:60] = 1
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 1, "category_id": 7, "segmentation": [SQUARE], "bbox": [10, 10, 20, 15], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 9, "segmentation": mask_to_rle(rle_mask), "bbox": [40, 30, 20, 10],
             "iscrowd": 0},
        ]
    coco = {
        "images": [{"id": 1, "file_name": f"a.{image_format}", "height": 48, "width": 64},
                   {"id": 2, "file_name": f"b.{image_format}", "height": 48, "width": 64}],
        "annotations": annotations,
        "categories": [{"id": 7, "name": "ship"}, {"id": 9, "name": "tank"}],
    }
    path = root / "ann.json"
    path.write_text(json.dumps(coco))
    return path


def test_polygons_and_rle_decode_to_targets(tmp_path: Path) -> None:
    ds = CocoInstanceDataset(write_dataset(tmp_path), tmp_path / "img")
    image, target = ds[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert target["labels"].tolist() == [1, 2]  # category ids 7, 9 -> labels 1, 2
    masks = target["masks"]
    assert isinstance(masks, InstanceMasks) and len(masks) == 2 and masks.image_size == (48, 64)
    assert masks.areas().tolist()[1] == 200
    full = masks.to_full()
    assert full.shape == (2, 48, 64) and full.dtype == torch.uint8
    assert torch.equal(full[1], torch.from_numpy(segmentation_to_mask(ds.index.anns_by_image[1][1]["segmentation"], 48, 64)))
    assert torch.allclose(target["boxes"][1], torch.tensor([40.0, 30.0, 60.0, 40.0]))
    assert ds.label_to_category == [7, 9] and ds.class_names == ["ship", "tank"]


def test_missing_area_is_derived_from_the_mask(tmp_path: Path) -> None:
    ds = CocoInstanceDataset(write_dataset(tmp_path), tmp_path / "img")
    areas = [a["area"] for a in ds.index.to_coco()["annotations"]]
    assert areas == [300.0, 200.0]


def test_image_without_instances_is_kept(tmp_path: Path) -> None:
    ds = CocoInstanceDataset(write_dataset(tmp_path), tmp_path / "img")
    assert len(ds) == 2
    _, target = ds[1]
    assert target["boxes"].shape == (0, 4) and len(target["masks"]) == 0


def test_grey_uint16_png_is_repeated_to_three_bands(tmp_path: Path) -> None:
    path = write_dataset(tmp_path)
    grey = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "img" / "a.png")
    image, _ = CocoInstanceDataset(path, tmp_path / "img")[0]
    assert image.shape == (3, 48, 64)
    assert torch.allclose(image[0], image[2])
    assert float(image[0, 47, 63]) == pytest.approx(float(grey[47, 63]) / 65535, rel=1e-5)


def test_four_band_tiff(tmp_path: Path) -> None:
    path = write_dataset(tmp_path, image_format="tif")
    bands = np.random.default_rng(1).integers(0, 4000, (4, 48, 64), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "img" / "a.tif", bands)  # band-first, as GeoTIFFs store it
    image, _ = CocoInstanceDataset(path, tmp_path / "img", in_channels=4)[0]
    assert image.shape == (4, 48, 64)
    assert float(image[3, 5, 7]) == pytest.approx(bands[3, 5, 7] / 65535, rel=1e-5)


def test_band_mismatch_names_the_file(tmp_path: Path) -> None:
    ds = CocoInstanceDataset(write_dataset(tmp_path), tmp_path / "img", in_channels=4)
    with pytest.raises(ValueError, match=r"a\.png.*3 bands.*in_channels is 4"):
        ds[0]


def test_augmentation_is_seeded_per_sample_and_epoch(tmp_path: Path) -> None:
    path = write_dataset(tmp_path)
    cfg = DataConfig(hflip=0.5, vflip=0.5, rot90=0.5, color_jitter=0.2)
    make = lambda: CocoInstanceDataset(path, tmp_path / "img", transforms=build_train_transforms(cfg, 3), seed=5)  # noqa: E731
    first, second = make(), make()
    a_img, a_t = first[0]
    b_img, b_t = second[0]
    assert torch.equal(a_img, b_img) and torch.equal(a_t["masks"].to_full(), b_t["masks"].to_full())
    draws = set()
    for epoch in range(6):
        first.set_epoch(epoch)
        img, target = first[0]
        draws.add(tuple(target["boxes"].flatten().tolist()))
        full = target["masks"].to_full()
        assert full.sum(dim=(1, 2)).tolist() == [300, 200]  # flips/rot90 keep areas
        assert torch.equal(target["boxes"], _tight_boxes(full))
    assert len(draws) > 1


@pytest.mark.parametrize("scale_range", [[1.0, 1.0], [0.6, 1.7]])
def test_image_and_masks_move_together(tmp_path: Path, scale_range: list[float]) -> None:
    """The image is white exactly on its instances; after any draw its white pixels are the masks."""
    path = write_dataset(tmp_path)
    ds = CocoInstanceDataset(path, tmp_path / "img")
    union = ds[0][1]["masks"].to_full().amax(0).numpy()
    Image.fromarray(np.repeat(union[..., None] * 255, 3, axis=2).astype(np.uint8)).save(tmp_path / "img" / "a.png")
    cfg = DataConfig(hflip=0.5, vflip=0.5, rot90=1.0, scale_range=scale_range)
    ds = CocoInstanceDataset(path, tmp_path / "img", transforms=build_train_transforms(cfg, 3), seed=1)
    shapes = set()
    for epoch in range(8):
        image, target = ds[(0, epoch)]
        white = image[0] > 0.5
        masks = target["masks"].to_full().amax(0).bool()
        shapes.add(tuple(white.shape))
        assert white.shape == masks.shape
        assert (white ^ masks).float().mean() < (0.02 if scale_range != [1.0, 1.0] else 1e-9)
    assert len(shapes) > 1  # rotations (and scales) happened


def _tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    out = []
    for m in masks:
        ys, xs = torch.where(m > 0)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(out, dtype=torch.float32)


# ---- bad input: every case names the file and the annotation or image id ----

def _ann(**extra) -> dict:
    return {"id": 41, "image_id": 1, "category_id": 7, "segmentation": [SQUARE], "bbox": [10, 10, 20, 15], **extra}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (_ann(segmentation=[[10, 10, 20, 20]]), r"annotation id 41 .*polygon with 2 points"),
        (_ann(bbox=[70, 60, 5, 5]), r"annotation id 41 .*outside the 64x48 image"),
        (_ann(bbox=[10, 10, 0, 15]), r"annotation id 41 .*zero area"),
        (_ann(category_id=99), r"annotation id 41 .*unknown category_id 99"),
        (_ann(image_id=77), r"annotation id 41.*unknown image_id 77"),
    ],
    ids=["short-polygon", "box-outside", "zero-area-box", "unknown-category", "unknown-image"],
)
def test_bad_annotation_raises_naming_file_and_id(tmp_path: Path, bad: dict, message: str) -> None:
    path = write_dataset(tmp_path, [bad])
    with pytest.raises(DataError, match=message) as err:
        CocoInstanceDataset(path, tmp_path / "img")
    assert str(path) in str(err.value)


def test_repair_counts_every_skip(tmp_path: Path) -> None:
    anns = [
        _ann(id=1, segmentation=[[10, 10, 20, 20]]),
        _ann(id=2, bbox=[70, 60, 5, 5]),
        _ann(id=3, bbox=[10, 10, 0, 15]),
        _ann(id=4, category_id=99),
        _ann(id=5, bbox=[50, 30, 30, 10]),  # overhangs the right border: clipped, kept
        _ann(id=6),
    ]
    ds = CocoInstanceDataset(write_dataset(tmp_path, anns), tmp_path / "img", repair=True)
    report = ds.index.report
    assert report.counts == {"polygon with < 3 points": 1, "box outside image": 1, "zero-area box": 1,
                             "unknown category id": 1, "box clipped to image": 1}
    assert [a["id"] for a in ds.index.anns_by_image[1]] == [5, 6]
    assert ds.index.anns_by_image[1][0]["bbox"] == [50.0, 30.0, 14.0, 10.0]
    summary = report.summary()
    assert "5 annotations skipped or repaired" in summary and "annotation id 4" in summary


def test_missing_image_file(tmp_path: Path) -> None:
    path = write_dataset(tmp_path)
    (tmp_path / "img" / "b.png").unlink()
    with pytest.raises(DataError, match=r"image id 2 .*b\.png.*not found"):
        CocoInstanceDataset(path, tmp_path / "img")
    repaired = CocoInstanceDataset(path, tmp_path / "img", repair=True)
    assert len(repaired) == 1 and repaired.index.report.counts["missing image file"] == 1


def test_unreadable_image(tmp_path: Path) -> None:
    path = write_dataset(tmp_path)
    (tmp_path / "img" / "a.png").write_bytes(b"not a png at all")
    ds = CocoInstanceDataset(path, tmp_path / "img")
    with pytest.raises(DataError, match=r"a\.png: cannot decode image.*image id 1"):
        ds[0]


def test_size_mismatch_names_fields(tmp_path: Path) -> None:
    path = write_dataset(tmp_path)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    with pytest.raises(DataError, match=r"a\.png: size 10x10 does not match width/height 64x48 of image id 1"):
        CocoInstanceDataset(path, tmp_path / "img")[0]


@pytest.mark.parametrize("text", ['{"images": [', "[]", '{"images": [], "annotations": []}'],
                         ids=["truncated", "not-an-object", "no-categories"])
def test_malformed_json(tmp_path: Path, text: str) -> None:
    path = tmp_path / "ann.json"
    path.write_text(text)
    with pytest.raises(DataError, match=str(path)):
        CocoInstanceDataset(path, tmp_path)


def test_duplicate_annotation_ids(tmp_path: Path) -> None:
    path = write_dataset(tmp_path, [_ann(id=3), _ann(id=3)])
    with pytest.raises(DataError, match="duplicate annotation id 3"):
        CocoInstanceDataset(path, tmp_path / "img")


def test_jitter_can_leave_saturation_and_hue_alone() -> None:
    """``jitter_saturation_hue: false`` (the iSAID report's jitter) uses brightness and contrast only."""
    import albumentations as A

    plain = build_train_transforms(DataConfig(hflip=0, vflip=0, rot90=0, color_jitter=0.2,
                                              jitter_saturation_hue=False), 3)
    full = build_train_transforms(DataConfig(hflip=0, vflip=0, rot90=0, color_jitter=0.2), 3)
    assert isinstance(plain.photometric.transforms[0], A.RandomBrightnessContrast)
    assert isinstance(full.photometric.transforms[0], A.ColorJitter)
