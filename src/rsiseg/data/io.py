"""Image reading for 1-, 3- and N-band imagery (uint8/uint16 PNG, JPEG, TIFF).

Every reader returns ``[H, W, C]`` arrays; :func:`to_unit_float` maps them to ``float32`` in
[0, 1], the scale the models expect (per-band normalisation happens inside the model).

Before decoding, :func:`read_image` reads the header and refuses an image of more than
:func:`pixel_limit` pixels (``H x W``, or all samples over the bands for odd TIFF layouts): a
1 MB tiled TIFF can claim 10 GiB. The limit is ``MAX_PIXELS``, raised per process with the
environment variable ``RSISEG_MAX_PIXELS`` or per call with ``max_pixels=``. It replaces
Pillow's own decompression-bomb limit (about 179 M pixels), which would refuse large iSAID
scenes.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

TIFF_SUFFIXES = {".tif", ".tiff"}
# 2**30 pixels (32768 x 32768): 6x the largest iSAID scenes (about 13,000 x 13,000) and 4x a
# 16k x 16k scene, while one such RGB uint8 image still decodes into 3 GiB (12 GiB as float32).
MAX_PIXELS = 2**30
MAX_PIXELS_ENV = "RSISEG_MAX_PIXELS"


class ImageReadError(OSError):
    """An image file is missing or cannot be decoded; the message names the file."""


class ImageTooLargeError(ImageReadError):
    """An image has more pixels than the limit (:func:`pixel_limit`); the message names the file and size."""


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image as ``[H, W, C]`` in its stored dtype (uint8, uint16 or float).

    Args:
        path: a PNG, JPEG, BMP or other Pillow-readable file, or a TIFF (read with tifffile).
        max_pixels: refuse images with more pixels; None uses :func:`pixel_limit`.

    Raises:
        ImageTooLargeError: the header claims more than ``max_pixels`` pixels (nothing is decoded).
        ImageReadError: the file is missing or not a readable image.
    """
    path = Path(path)
    check_image_header(path, max_pixels)
    try:
        with _pillow_limit_off():
            if path.suffix.lower() in TIFF_SUFFIXES:
                array = _read_tiff(path)
            else:
                with Image.open(path) as img:
                    array = _pil_to_array(img)
    except Exception as err:  # PIL and tifffile raise many types for corrupt files
        raise ImageReadError(f"{path}: cannot decode image ({_describe(err, path)})") from None
    return array[:, :, None] if array.ndim == 2 else array


def check_image_header(path: str | Path, max_pixels: int | None = None) -> tuple[int, int]:
    """Read an image's header and check its size against the pixel limit, decoding no pixels.

    Returns:
        ``(height, width)``.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` (default :func:`pixel_limit`) pixels.
        ImageReadError: the file is missing or its header is not an image's.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    try:
        height, width, pixels = _header_size(path)
    except Exception as err:  # as in read_image: any decoder error means "not a readable image"
        raise ImageReadError(f"{path}: cannot decode image ({_describe(err, path)})") from None
    limit = pixel_limit() if max_pixels is None else max_pixels
    if pixels > limit:
        raise ImageTooLargeError(
            f"{path}: image is {width} x {height} ({pixels:,} pixels), over the limit of {limit:,} pixels; "
            f"raise it with the environment variable {MAX_PIXELS_ENV}=N if the file is trusted")
    return height, width


def _describe(err: Exception, path: Path) -> str:
    """``"Type: message"`` of a decoder error, without the path that the message already starts with."""
    return f"{type(err).__name__}: {str(err).replace(f' {str(path)!r}', '').replace(str(path), 'the file')}"


def pixel_limit() -> int:
    """The pixel limit of :func:`read_image`: ``RSISEG_MAX_PIXELS`` when set, else ``MAX_PIXELS``.

    Raises:
        ValueError: ``RSISEG_MAX_PIXELS`` is not a positive integer (named).
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"environment variable {MAX_PIXELS_ENV}={raw!r} must be a positive integer (pixels)")
    return value


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """Scale an integer image to ``float32`` [0, 1] by its dtype's range; floats are clipped."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / float(np.iinfo(image.dtype).max)
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def match_bands(image: np.ndarray, in_channels: int, path: str | Path) -> np.ndarray:
    """Give ``[H, W, C]`` the model's band count: grey is repeated to 3 bands, RGB averaged to 1.

    Raises:
        ImageReadError: any other mismatch, naming the file and both counts.
    """
    bands = image.shape[2]
    if bands == in_channels:
        return image
    if bands == 1 and in_channels == 3:
        return np.repeat(image, 3, axis=2)
    if bands == 3 and in_channels == 1:
        return image.mean(axis=2, keepdims=True, dtype=np.float32).astype(image.dtype)
    raise ImageReadError(f"{path}: image has {bands} bands but model.in_channels is {in_channels}")


def _pil_to_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img, dtype=np.uint16)
    if img.mode == "I":
        return np.asarray(img).astype(np.uint16) if np.asarray(img).max() < 65536 else np.asarray(img)
    if img.mode in ("P", "CMYK", "YCbCr", "LA", "RGBA"):
        img = img.convert("RGB")
    elif img.mode not in ("L", "RGB", "F"):
        img = img.convert("RGB")
    return np.asarray(img)


def is_band_first(shape: tuple[int, ...]) -> bool:
    """True for a ``[C, H, W]`` raster shape (the GeoTIFF layout): a short leading axis of <= 32 bands."""
    return len(shape) == 3 and shape[0] < min(shape[1:]) and shape[0] <= 32


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header, without decoding the pixels."""
    height, width, _ = _header_size(Path(path))
    return height, width


def _header_size(path: Path) -> tuple[int, int, int]:
    """``(height, width, pixels)`` from the header; ``pixels`` is all samples over the band count,
    so a TIFF series of pages (``[P, H, W]``, ``[P, H, W, C]``) counts every page."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            shape = tuple(int(v) for v in tif.series[0].shape)
        if is_band_first(shape):
            return shape[1], shape[2], shape[1] * shape[2]
        bands = shape[2] if len(shape) == 3 and shape[2] <= 32 else 1
        return shape[0], shape[1] if len(shape) > 1 else 1, math.prod(shape) // bands
    with _pillow_limit_off(), Image.open(path) as img:
        return img.height, img.width, img.height * img.width


@contextlib.contextmanager
def _pillow_limit_off() -> Iterator[None]:
    """Turn Pillow's decompression-bomb check off while our own limit applies (it was checked first)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    array = tifffile.imread(path)
    return np.transpose(array, (1, 2, 0)) if is_band_first(array.shape) else array
