"""Tests of rsiseg.data.io: the pixel limit checked on the header before any decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from rsiseg.data import io
from rsiseg.data.io import ImageReadError, ImageTooLargeError, check_image_header, image_size, read_image


def _png(path: Path, size: int = 16) -> Path:
    Image.fromarray(np.full((size, size, 3), 7, np.uint8)).save(path)
    return path


def _tiff_claiming(path: Path, side: int) -> Path:
    """A ~600-byte tiled TIFF whose header claims ``side x side`` pixels (a decompression bomb)."""
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), tile=(16, 16), compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(side)
        tif.pages[0].tags["ImageLength"].overwrite(side)
    return path


def test_tiff_header_claiming_10_gigapixels_is_refused_before_decoding(tmp_path: Path) -> None:
    path = _tiff_claiming(tmp_path / "bomb.tif", 100_000)
    assert path.stat().st_size < 2000
    for read in (read_image, check_image_header):
        with pytest.raises(ImageTooLargeError) as info:
            read(path)
        message = str(info.value)
        assert "bomb.tif" in message and "100000 x 100000" in message and "RSISEG_MAX_PIXELS" in message
    assert isinstance(info.value, ImageReadError) and isinstance(info.value, OSError)  # the CLI's exit-2 path


def test_limit_comes_from_module_setting_env_var_or_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _png(tmp_path / "small.png")  # 256 pixels
    monkeypatch.setattr(io, "MAX_PIXELS", 255)
    with pytest.raises(ImageTooLargeError, match=r"small\.png: image is 16 x 16 \(256 pixels\), over the limit of 255"):
        read_image(path)
    assert read_image(path, max_pixels=256).shape == (16, 16, 3)
    monkeypatch.setenv("RSISEG_MAX_PIXELS", "1000")
    assert read_image(path).shape == (16, 16, 3)
    monkeypatch.setenv("RSISEG_MAX_PIXELS", "100")
    with pytest.raises(ImageTooLargeError, match="over the limit of 100 pixels"):
        read_image(path)
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv("RSISEG_MAX_PIXELS", bad)
        with pytest.raises(ValueError, match="RSISEG_MAX_PIXELS"):
            read_image(path)


def test_default_limit_keeps_large_isaid_scenes_readable() -> None:
    assert io.MAX_PIXELS >= 20_000 * 20_000 > 13_000 * 13_000


def test_pillow_bomb_limit_is_replaced_by_ours_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow alone refuses images above 2 x MAX_IMAGE_PIXELS (about 179 M pixels by default),
    # which a large iSAID scene can exceed; our limit applies instead.
    path = _png(tmp_path / "scene.png", 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert read_image(path).shape == (64, 64, 3)
    assert image_size(path) == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_tiff_pages_and_bands_are_counted(tmp_path: Path) -> None:
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((40, 64, 64), np.uint8))  # 40 pages: not bands
    with pytest.raises(ImageTooLargeError, match="163,840 pixels"):
        read_image(stack, max_pixels=100_000)
    band_first = tmp_path / "bands.tif"
    tifffile.imwrite(band_first, np.zeros((4, 64, 64), np.uint16))  # GeoTIFF layout: 4 bands of 64 x 64
    assert check_image_header(band_first, max_pixels=4096) == (64, 64)
    assert read_image(band_first, max_pixels=4096).shape == (64, 64, 4)


def test_missing_and_non_image_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"gone\.png: image file not found"):
        read_image(tmp_path / "gone.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageReadError, match=r"notes\.png: cannot decode image"):
        read_image(text)


@pytest.mark.parametrize("compression", ["lzw", "deflate", "zstd"])
def test_compressed_geotiffs_are_read(tmp_path: Path, compression: str) -> None:
    """Remote-sensing TIFFs are often LZW- or deflate-compressed; imagecodecs decodes them."""
    data = np.random.default_rng(0).integers(0, 4000, (40, 30, 4), dtype=np.uint16)
    path = tmp_path / f"scene_{compression}.tif"
    tifffile.imwrite(path, data, compression=compression, photometric="rgb", extrasamples=[0])
    assert np.array_equal(read_image(path), data)
