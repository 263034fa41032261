"""iSAID release PNGs -> COCO: a hand-built layout with known answers, then the real samples.

The real-sample tests skip when ``../shared/data`` is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsiseg.data.converters.isaid import (
    HRSID_CLASSES,
    ISAID_CLASSES,
    convert_isaid,
    instances_from_pngs,
)
from rsiseg.structures import segmentation_to_mask

PALETTE = {name: rgb for name, rgb in ISAID_CLASSES}
CLASS_ID = {name: i for i, (name, _) in enumerate(ISAID_CLASSES, 1)}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def write_scene(folder: Path, stem: str, objects: list[tuple[tuple[int, int, int], tuple[int, int, int], np.ndarray]],
                size: tuple[int, int] = (64, 80), image: bool = True) -> None:
    """Write one scene; ``objects`` are (instance colour, class colour, mask)."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.zeros((*size, 3), np.uint8)
    classes = np.zeros((*size, 3), np.uint8)
    for inst_rgb, class_rgb, mask in objects:
        ids[mask > 0] = inst_rgb
        classes[mask > 0] = class_rgb
    if image:
        Image.fromarray(np.full((*size, 3), 90, np.uint8)).save(folder / f"{stem}.png")
    Image.fromarray(ids).save(folder / f"{stem}_instance_id_RGB.png")
    Image.fromarray(classes).save(folder / f"{stem}_instance_color_RGB.png")


def box(y0: int, y1: int, x0: int, x1: int, size: tuple[int, int] = (64, 80)) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


@pytest.fixture()
def tiny_layout(tmp_path: Path) -> Path:
    """Two scenes in the release layout, plus one scene without its image."""
    src = tmp_path / "isaid"
    ring = box(10, 40, 30, 60) - box(18, 32, 38, 52)  # a storage tank with a hole
    write_scene(src / "train" / "images", "P0001", [
        ((10, 20, 30), PALETTE["Small_Vehicle"], box(2, 8, 2, 12)),
        ((40, 50, 60), PALETTE["storage_tank"], ring),
        ((70, 80, 90), (1, 2, 3), box(50, 60, 2, 10)),  # no palette colour under it
    ])
    # A plane whose class pixels are mostly "plane" with a minority of "Helicopter": majority wins.
    write_scene(src / "val" / "images", "P0002", [
        ((200, 0, 0), PALETTE["plane"], box(5, 25, 5, 30)),
        ((0, 200, 0), PALETTE["ship"], box(40, 50, 50, 75)),
        ((0, 0, 200), PALETTE["Harbor"], box(30, 31, 2, 3)),  # a single pixel
    ])
    p2 = src / "val" / "images" / "P0002_instance_color_RGB.png"
    classes = np.asarray(Image.open(p2)).copy()
    classes[5:8, 5:30] = PALETTE["Helicopter"]
    Image.fromarray(classes).save(p2)
    write_scene(src / "val" / "images", "P0009", [((9, 9, 9), PALETTE["ship"], box(1, 5, 1, 5))], image=False)
    return src


def test_tiny_layout(tiny_layout: Path, tmp_path: Path) -> None:
    summary = convert_isaid(tiny_layout, tmp_path / "out", min_area=2, progress=False)
    coco = json.loads((tmp_path / "out" / "annotations" / "instances.json").read_text())

    assert summary["images"] == 2 and summary["instances"] == 4
    assert summary["skipped"] == {"no class colour": 1, "below min_area": 1, "scene: no image": 1}
    assert summary["per_class"] == {"Small_Vehicle": 1, "storage_tank": 1, "plane": 1, "ship": 1}
    assert [img["file_name"] for img in coco["images"]] == ["train/images/P0001.png", "val/images/P0002.png"]
    assert [img["id"] for img in coco["images"]] == [1, 2]
    assert [c["id"] for c in coco["categories"]] == list(range(1, 16))

    by_class = {a["category_id"]: a for a in coco["annotations"]}
    assert set(by_class) == {CLASS_ID[n] for n in ("Small_Vehicle", "storage_tank", "plane", "ship")}
    tank = by_class[CLASS_ID["storage_tank"]]
    assert isinstance(tank["segmentation"], dict)  # the hole forces an RLE
    assert tank["bbox"] == [30.0, 10.0, 30.0, 30.0] and tank["area"] == 30 * 30 - 14 * 14
    decoded = segmentation_to_mask(tank["segmentation"], 64, 80)
    expected = box(10, 40, 30, 60) - box(18, 32, 38, 52)
    assert (decoded == expected).all() and decoded[25, 45] == 0
    car = by_class[CLASS_ID["Small_Vehicle"]]
    assert isinstance(car["segmentation"], list) and car["bbox"] == [2.0, 2.0, 10.0, 6.0] and car["area"] == 60
    assert iou(segmentation_to_mask(car["segmentation"], 64, 80), box(2, 8, 2, 12)) == 1.0
    assert all(a["iscrowd"] == 0 for a in coco["annotations"])
    # Deterministic: a second run writes the same file.
    convert_isaid(tiny_layout, tmp_path / "again", min_area=2, progress=False)
    assert (tmp_path / "again" / "annotations" / "instances.json").read_text() == json.dumps(coco)


def test_instances_from_pngs_shapes() -> None:
    """Polygons of thin, diagonal and multi-part instances decode back to their masks."""
    size = (48, 48)
    ids = np.zeros((*size, 3), np.uint8)
    masks = {
        (1, 0, 0): box(2, 3, 2, 40, size),  # one pixel high
        (2, 0, 0): np.eye(48, dtype=np.uint8) * box(10, 30, 0, 48, size),  # a one-pixel diagonal
        (3, 0, 0): box(35, 40, 5, 10, size) | box(35, 40, 20, 25, size),  # two parts
        (4, 0, 0): box(44, 45, 44, 45, size),  # one pixel
    }
    for rgb, mask in masks.items():
        ids[mask > 0] = rgb
    colours = np.where(ids.any(-1, keepdims=True), np.array(PALETTE["ship"], np.uint8), 0).astype(np.uint8)
    instances = instances_from_pngs(ids, colours)
    assert [inst["colour"] for inst in instances] == sorted(masks)
    for inst in instances:
        mask = masks[inst["colour"]].astype(np.uint8)
        assert inst["category_id"] == CLASS_ID["ship"] and inst["area"] == mask.sum()
        assert iou(segmentation_to_mask(inst["segmentation"], *size), mask) == 1.0, inst["colour"]
    assert len(instances[2]["segmentation"]) == 2  # one polygon per part


def label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels ``int[H, W]`` (0 = background) and the pixel count of each label."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int32)
    keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    _, labels = np.unique(keys, return_inverse=True)  # black, when present, sorts first as 0
    labels = labels.reshape(keys.shape) + (0 if (keys == 0).any() else 1)
    return labels, np.bincount(labels.ravel())


def check_against_pngs(src: Path, out: Path, summary: dict) -> None:
    """Per scene: instances == distinct non-black id colours; each segmentation decodes to its instance."""
    coco = json.loads((out / "annotations" / "instances.json").read_text())
    for img in coco["images"]:
        labels, areas = label_map(src / img["file_name"].replace(".png", "_instance_id_RGB.png"))
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        assert summary["per_image"][img["file_name"]] == len(anns) == int((areas[1:] > 0).sum())
        seen = set()
        for ann in anns:
            decoded = segmentation_to_mask(ann["segmentation"], img["height"], img["width"]) > 0
            # The instance is the id label that the decoded mask mostly covers.
            label = int(np.bincount(labels[decoded]).argmax())
            assert label > 0 and label not in seen and areas[label] == ann["area"]
            seen.add(label)
            x, y, w, h = (int(v) for v in ann["bbox"])
            ys, xs = np.nonzero(labels[y:y + h, x:x + w] == label)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, w, h)  # tight bbox
            truth = labels == label
            assert iou(decoded, truth) >= 0.9  # every instance, tiny vehicles included
    assert summary["instances"] == len(coco["annotations"])


def test_isaid_samples(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "isaid_samples"
    if not src.is_dir():
        pytest.skip(f"{src} absent")
    summary = convert_isaid(src, tmp_path, progress=False)
    assert summary["skipped"] == {}  # the samples are clean
    assert summary["images"] == 3 and summary["instances"] == 306
    assert set(summary["per_class"]) <= set(PALETTE)
    check_against_pngs(src, tmp_path, summary)


def test_hrsid_samples(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "hrsid_samples"
    if not src.is_dir():
        pytest.skip(f"{src} absent")
    summary = convert_isaid(src, tmp_path, progress=False, classes=HRSID_CLASSES)
    assert summary["skipped"] == {} and summary["per_class"] == {"ship": 146}
    check_against_pngs(src, tmp_path, summary)
    # With the iSAID palette the ships' (128, 0, 0) matches no class: every one is counted, none silent.
    wrong = convert_isaid(src, tmp_path / "isaid_palette", progress=False)
    assert wrong["instances"] == 0 and wrong["skipped"] == {"no class colour": 146}
