"""``rsiseg data split-semantic``: Potsdam-style tiles and RGB labels cut into patches, split by tile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from rsiseg.cli import main
from rsiseg.data.converters.potsdam import POTSDAM_PALETTE
from rsiseg.data.semantic import SemanticDataset

TILES = ("2_10", "2_11", "3_10", "4_12")


def write_tiles(root: Path, height: int = 70, width: int = 90) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ISPRS-named 4-band uint8 tiles and RGB palette labels; returns ``{key: (image, label)}``."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    tiles = {}
    for name in TILES:
        image = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        label = np.asarray(POTSDAM_PALETTE, dtype=np.uint8)[rng.integers(0, 6, (height, width))]
        tifffile.imwrite(root / "images" / f"top_potsdam_{name}_RGBIR.tif", image, photometric="minisblack")
        tifffile.imwrite(root / "labels" / f"top_potsdam_{name}_label.tif", label, photometric="rgb")
        tiles[f"top_potsdam_{name}"] = (image, label)
    return tiles


def test_tiles_are_cut_into_patches_and_split_by_tile(tmp_path: Path) -> None:
    tiles = write_tiles(tmp_path / "src")
    out = tmp_path / "potsdam"
    argv = ["-q", "data", "split-semantic", "--images", str(tmp_path / "src/images"), "--labels",
            str(tmp_path / "src/labels"), "--out", str(out), "--label-format", "potsdam_rgb", "--size", "30",
            "--val-fraction", "0.25", "--seed", "3"]
    assert main(argv) == 0
    summary = json.loads((out / "split.json").read_text())
    assert len(summary["val"]["tiles"]) == 1 and len(summary["train"]["tiles"]) == 3
    assert sorted(summary["train"]["tiles"] + summary["val"]["tiles"]) == sorted(tiles)
    per_tile = 3 * 3  # rows y = 0, 30, 40 and columns x = 0, 30, 60: the last ones flush with the border
    assert (summary["train"]["patches"], summary["val"]["patches"]) == (3 * per_tile, per_tile)

    key = summary["val"]["tiles"][0]
    image, label = tiles[key]
    with tifffile.TiffFile(out / "val" / "images" / f"Image_{key}_40_60.tif") as tif:
        assert len(tif.pages) == 1 and tif.pages[0].shape == (30, 30, 4)  # one page, bands interleaved
        patch = tif.asarray()
    assert np.array_equal(patch, image[40:70, 60:90])  # every band, flush with the bottom-right corner
    rgb = np.asarray(Image.open(out / "val" / "labels" / f"Label_{key}_40_60.png").convert("RGB"))
    assert np.array_equal(rgb, label[40:70, 60:90])

    data = SemanticDataset(out / "train" / "images", out / "train" / "labels", label_format="potsdam_rgb",
                           in_channels=4)
    assert len(data) == 3 * per_tile and data[0][0].shape == (4, 30, 30)

    assert main(argv) == 2  # the splits exist: refused, nothing replaced
    again = tmp_path / "again"
    assert main([*argv[:-6], "--out", str(again), "--size", "30", "--val-tiles", "top_potsdam_2_11_RGBIR.tif"]) == 0
    assert json.loads((again / "split.json").read_text())["val"]["tiles"] == ["top_potsdam_2_11"]
    assert json.loads((again / "classes.json").read_text())["names"][4] == "car"


def test_index_labels_stay_indices_and_unlabelled_tiles_can_be_skipped(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("a", "b", "c"):
        tifffile.imwrite(tmp_path / "images" / f"{name}.tif", np.zeros((40, 40), dtype=np.uint16))
    label = np.arange(40 * 40, dtype=np.uint8).reshape(40, 40) % 7
    Image.fromarray(label).save(tmp_path / "labels" / "a.png")
    Image.fromarray(label).save(tmp_path / "labels" / "b.png")
    (tmp_path / "labels" / "classes.json").write_text(json.dumps({"names": [f"k{i}" for i in range(7)]}))
    out = tmp_path / "out"
    argv = ["-q", "data", "split-semantic", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
            "--out", str(out), "--size", "20", "--val-fraction", "0.5"]
    assert main(argv) == 2 and not out.exists()  # c.tif has no label
    assert main([*argv, "--skip-unlabelled"]) == 0
    summary = json.loads((out / "split.json").read_text())
    assert summary["unlabelled_skipped"] == ["c.tif"] and summary["train"]["patches"] == summary["val"]["patches"] == 4
    key = summary["val"]["tiles"][0]
    written = np.asarray(Image.open(out / "val" / "labels" / f"Label_{key}_20_0.png"))
    assert written.dtype == np.uint8 and np.array_equal(written, label[20:40, 0:20])
    assert tifffile.imread(out / "val" / "images" / f"Image_{key}_20_0.tif").dtype == np.uint16
    assert json.loads((out / "classes.json").read_text())["names"][6] == "k6"


def test_bad_pairs_are_named_and_leave_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tiles(tmp_path / "src")
    small = np.zeros((10, 10, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "src" / "labels" / "top_potsdam_4_12_label.tif", small, photometric="rgb")
    out = tmp_path / "out"
    argv = ["-q", "data", "split-semantic", "--images", str(tmp_path / "src/images"), "--labels",
            str(tmp_path / "src/labels"), "--out", str(out), "--size", "30", "--label-format", "potsdam_rgb"]
    assert main(argv) == 2
    assert "top_potsdam_4_12_label.tif: 10 x 10 px, but its image top_potsdam_4_12_RGBIR.tif is 90 x 70" in (
        capsys.readouterr().err)
    assert not (out / "train").exists() and not (out / "val").exists() and not (out / ".split.partial").exists()
    assert main([*argv, "--val-tiles", "top_potsdam_9_99"]) == 2
    assert "--val-tiles top_potsdam_9_99: no such tile" in capsys.readouterr().err
    assert main([*argv, "--label-format", "index"]) == 2  # RGB labels are not index maps
    assert "top_potsdam_2_10_label.tif: expected a single-band map of class indices" in capsys.readouterr().err
    assert not out.exists()
