"""Image reading for 1-, 3- and N-band imagery (uint8/uint16 PNG, JPEG, TIFF).

Every reader returns ``[H, W, C]`` arrays; :func:`to_unit_float` maps them to ``float32`` in
[0, 1], the scale the models expect (per-band normalisation happens inside the model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TIFF_SUFFIXES = {".tif", ".tiff"}


class ImageReadError(OSError):
    """An image file is missing or cannot be decoded; the message names the file."""


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as ``[H, W, C]`` in its stored dtype (uint8, uint16 or float).

    Raises:
        ImageReadError: the file is missing or not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            array = _read_tiff(path)
        else:
            with Image.open(path) as img:
                array = _pil_to_array(img)
    except ImageReadError:
        raise
    except Exception as err:  # PIL and tifffile raise many types for corrupt files
        raise ImageReadError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from None
    return array[:, :, None] if array.ndim == 2 else array


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
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            shape = tif.series[0].shape
        return (shape[1], shape[2]) if is_band_first(shape) else (shape[0], shape[1])
    with Image.open(path) as img:
        return img.height, img.width


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    array = tifffile.imread(path)
    return np.transpose(array, (1, 2, 0)) if is_band_first(array.shape) else array
