"""Semantic segmentation dataset: image tiles paired by name with dense label maps, optionally made sparse.

Items are ``(image, target)``: ``image`` float32 ``[C, H, W]`` in [0, 1] and ``target``
``{"labels": int64 [H, W], "image_id": int64 scalar}`` (``image_id`` is the item's index). Labels
hold class indices ``0..K-1`` and ``ignore_index`` on unlabelled pixels. With a points config the
training labels keep only the points: drawn once per image from the dense labels (after resizing,
as a pure function of the points seed and the file name), or read from a point file.

Images and labels pair by name: the same stem, or the stem without tokens such as ``RGB``,
``IRRG``, ``Image`` or ``label`` (``top_potsdam_2_10_RGB.tif`` <-> ``top_potsdam_2_10_label.tif``,
``Image_12.tif`` <-> ``Label_12.tif``).
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import cv2
import numpy as np
import tifffile
import torch
from PIL import Image
from torch.utils.data import Dataset

from rsiseg.config import LABEL_FORMATS, PointsConfig
from rsiseg.data.coco_index import DataError
from rsiseg.data.converters.potsdam import POTSDAM_CLASSES, rgb_to_index
from rsiseg.data.io import TIFF_SUFFIXES, ImageReadError, check_image_header, match_bands, read_image, to_unit_float
from rsiseg.data.io import image_size as header_size
from rsiseg.data.loader import to_chw_tensor
from rsiseg.data.points import check_points_inside, count_for, point_label_map, read_point_file, sample_points

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", *TIFF_SUFFIXES}
# Name tokens that tell an image from its label (ISPRS: RGB, IRRG, RGBIR, label, label_noBoundary).
PAIR_TOKENS = {"rgb", "irrg", "rgbir", "image", "images", "img", "label", "labels", "noboundary", "mask", "gt"}

Target = dict[str, torch.Tensor]
PointSet = tuple[np.ndarray, np.ndarray]  # int64 [P, 2] (row, col), int64 [P] classes


def pair_key(name: str) -> str:
    """The name an image and its label share: the lower-case stem without :data:`PAIR_TOKENS`."""
    tokens = [t for t in re.split(r"[_\-. ]+", Path(name).stem.lower()) if t]
    kept = [t for t in tokens if t not in PAIR_TOKENS]
    return "_".join(kept or tokens)


def list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """``(image files, skipped other files)`` directly in ``folder``, sorted by name."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return ([p for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
            [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES and p.name != "classes.json"])


def pair_files(images: list[Path], labels: list[Path]) -> list[Path]:
    """The label of each image, matched by :func:`pair_key`.

    Raises:
        DataError: two files share a key, or an image has no label, or a label no image (named).
    """
    by_key: dict[str, Path] = {}
    for label in labels:
        other = by_key.setdefault(pair_key(label.name), label)
        if other != label:
            raise DataError(f"{label}: pairs with the same images as {other.name}")
    keys = [pair_key(p.name) for p in images]
    for image, key in zip(images, keys):
        if key not in by_key:
            raise DataError(f"{image}: no label map for this image in {labels[0].parent if labels else 'the labels'}")
        if keys.count(key) > 1:
            raise DataError(f"{image}: another image pairs with the same label {by_key[key].name}")
    for key, label in by_key.items():
        if key not in keys:
            raise DataError(f"{label}: label map without an image")
    return [by_key[k] for k in keys]


def read_label(path: Path, label_format: str) -> np.ndarray:
    """Read a label map as uint8 ``[H, W]`` class indices (255 = undefined for ``potsdam_rgb``).

    Raises:
        DataError: unreadable, too large, or not a single-band 8-bit index map (``index``) / RGB (``potsdam_rgb``).
    """
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"data.label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
    try:
        if label_format == "potsdam_rgb":
            rgb = read_image(path)
            if rgb.dtype != np.uint8 or rgb.shape[2] < 3:
                raise DataError(f"{path}: not an 8-bit RGB Potsdam label (shape {rgb.shape}, {rgb.dtype})")
            return rgb_to_index(rgb)
        check_image_header(path)
        if path.suffix.lower() in TIFF_SUFFIXES:
            array = tifffile.imread(path)
        else:
            with Image.open(path) as img:
                array = np.asarray(img)  # palette PNGs give their indices, not colours
    except ImageReadError as err:
        raise DataError(str(err)) from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot decode label map ({type(err).__name__}: {err})") from None
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer) or array.min(initial=0) < 0 \
            or array.max(initial=0) > 255:
        raise DataError(f"{path}: expected a single-band map of class indices 0..255, got shape {array.shape} "
                        f"{array.dtype}")
    return array.astype(np.uint8)


def read_classes_json(labels_dir: Path) -> list[str] | None:
    """Class names from ``classes.json`` (``{"names": [...]}``) in ``labels_dir``, its parent or grandparent
    (``out/labels/train`` finds ``out/classes.json``), if any."""
    found = _classes_json(labels_dir)
    if found is None:
        return None
    path, content = found
    names = content.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: field 'names' must be a list of strings")
    return names


def read_classes_palette(labels_dir: Path) -> list[list[int]] | None:
    """The optional ``palette`` of that ``classes.json``: one ``[R, G, B]`` per class (checked where it is used)."""
    found = _classes_json(labels_dir)
    palette = found[1].get("palette") if found else None
    if palette is not None and not isinstance(palette, list):
        raise DataError(f"{found[0]}: field 'palette' must be a list of [R, G, B] colours")
    return palette


def _classes_json(labels_dir: Path) -> tuple[Path, dict] | None:
    for path in (folder / "classes.json" for folder in (labels_dir, labels_dir.parent, labels_dir.parent.parent)):
        if path.is_file():
            try:
                content = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise DataError(f"{path}: not readable JSON ({type(err).__name__}: {err})") from None
            if not isinstance(content, dict):
                raise DataError(f"{path}: expected an object with the field 'names'")
            return path, content
    return None


def resize_image(image: np.ndarray, side: int) -> np.ndarray:
    """float32 ``[H, W, C]`` -> ``[side, side, C]``: area averaging to shrink, bilinear to enlarge."""
    if image.shape[:2] == (side, side):
        return image
    shrink = side * side < image.shape[0] * image.shape[1]
    resized = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return resized.reshape(side, side, image.shape[2])


def resize_labels(labels: np.ndarray, side: int) -> np.ndarray:
    """uint8 ``[H, W]`` -> ``[side, side]`` by nearest neighbour (labels are never mixed)."""
    if labels.shape == (side, side):
        return labels
    return cv2.resize(labels, (side, side), interpolation=cv2.INTER_NEAREST)


class SemanticDataset(Dataset):
    """Images and label maps paired by name (see the module docstring for the item format).

    Args:
        images_dir: folder of image tiles (PNG, JPEG, TIFF; any band count matched to ``in_channels``).
        labels_dir: folder of label maps, or None (images only, unless ``points.file`` gives labels).
        in_channels: bands the model expects.
        label_format: ``index`` (uint8 class indices) or ``potsdam_rgb`` (the ISPRS colours).
        image_size: resize images and labels to this square side; None keeps the size.
        points: make the labels sparse (drawn points, or ``points.file``); None keeps them dense.
        ignore_index: label value of unlabelled pixels.
        hflip, vflip, rot90: augmentation probabilities, drawn from ``(seed, epoch, index)``.
        seed: base of the augmentation draws.
        class_names: overrides ``classes.json`` / the Potsdam names.
    """

    def __init__(self, images_dir: str | Path, labels_dir: str | Path | None, *, in_channels: int,
                 label_format: str = "index", image_size: int | None = None, points: PointsConfig | None = None,
                 ignore_index: int = 255, hflip: float = 0.0, vflip: float = 0.0, rot90: float = 0.0,
                 seed: int = 0, class_names: list[str] | None = None) -> None:
        if label_format not in LABEL_FORMATS:
            raise ValueError(f"data.label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
        self.images_dir = Path(images_dir)
        self.labels_dir = Path(labels_dir) if labels_dir is not None else None
        self.in_channels, self.label_format, self.image_size = in_channels, label_format, image_size
        self.points, self.ignore_index, self.seed = points, ignore_index, seed
        self.flips = (hflip, vflip, rot90)
        self.epoch = 0
        self.image_paths, skipped = list_images(self.images_dir)
        if not self.image_paths:
            raise DataError(f"{self.images_dir}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.skipped = skipped
        self.label_paths = self._pair_labels() if self.labels_dir is not None else None
        self.class_names = class_names or self._default_class_names()
        # Colours of the classes for outputs: classes.json's, else chosen by name (see semantic_output.palette_for).
        self.palette = read_classes_palette(self.labels_dir) if self.labels_dir and label_format == "index" else None
        self._file_points = None  # point-file entries by pair key, so "x_RGB.tif" finds points given for "x_label"
        if points and points.file:
            entries = read_point_file(points.file, self.class_names)
            self._file_points = {pair_key(name): value for name, value in entries.items()}
        self._point_cache: dict[int, PointSet] = {}

    def _pair_labels(self) -> list[Path]:
        """The label of each image (sizes checked from the headers); counts the skipped label files."""
        assert self.labels_dir is not None
        labels, skipped = list_images(self.labels_dir)
        self.skipped += skipped
        label_paths = pair_files(self.image_paths, labels)
        for image, label in zip(self.image_paths, label_paths):
            if image_size_of(image) != image_size_of(label):
                raise DataError(f"{label}: size {image_size_of(label)} differs from its image {image.name} "
                                f"{image_size_of(image)} (height, width)")
        return label_paths

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def names(self) -> list[str]:
        """Image file names, in item order."""
        return [p.name for p in self.image_paths]

    def __len__(self) -> int:
        return len(self.image_paths)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draws; call before each epoch's loader is iterated."""
        self.epoch = epoch

    def _default_class_names(self) -> list[str]:
        if self.label_format == "potsdam_rgb":
            return list(POTSDAM_CLASSES)
        names = read_classes_json(self.labels_dir) if self.labels_dir else None
        if names is None and self.labels_dir is not None:  # no names anywhere: the largest label value tells K
            maps = (self._read_label(i) for i in range(len(self)))
            top = max(int(np.max(np.where(m == self.ignore_index, 0, m))) for m in maps)
            names = [f"class_{i}" for i in range(top + 1)]
        if names is None:
            raise DataError(f"{self.images_dir}: no labels folder and no class names given")
        return names

    def load_image(self, idx: int) -> np.ndarray:
        """Image ``idx`` as float32 ``[H, W, C]`` in [0, 1], resized to ``image_size`` when set."""
        path = self.image_paths[idx]
        try:
            image = to_unit_float(match_bands(read_image(path), self.in_channels, path))
        except ImageReadError as err:
            raise DataError(str(err)) from None
        return resize_image(image, self.image_size) if self.image_size else image

    def _read_label(self, idx: int) -> np.ndarray:
        assert self.label_paths is not None
        return read_label(self.label_paths[idx], self.label_format)

    def dense_labels(self, idx: int) -> np.ndarray:
        """The dense label map of image ``idx``: uint8 ``[H, W]``, resized like the image.

        Raises:
            DataError: no labels folder, or a value ``>= num_classes`` other than ``ignore_index`` (naming the file).
        """
        if self.label_paths is None:
            raise DataError(f"{self.image_paths[idx]}: no dense labels (the dataset has no labels folder)")
        labels = self._read_label(idx)
        bad = (labels >= self.num_classes) & (labels != self.ignore_index)
        if bad.any():
            raise DataError(f"{self.label_paths[idx]}: label value(s) {sorted(np.unique(labels[bad]).tolist())[:5]} "
                            f"are not classes 0..{self.num_classes - 1} nor the ignore index {self.ignore_index}")
        return resize_labels(labels, self.image_size) if self.image_size else labels

    def point_set(self, idx: int) -> PointSet:
        """The labelled points of image ``idx`` on the (resized) grid.

        Returns:
            int64 ``[P, 2]`` ``(row, col)`` and int64 ``[P]`` class indices; drawn once, then cached.
        """
        if self.points is None:
            raise ValueError("this dataset has no points config")
        if idx not in self._point_cache:
            self._point_cache[idx] = self._file_point_set(idx) if self._file_points is not None else self._drawn(idx)
        return self._point_cache[idx]

    def point_coords(self, idx: int) -> np.ndarray:
        """int64 ``[P, 2]`` ``(row, col)`` of the labelled points of image ``idx`` (for figures)."""
        return self.point_set(idx)[0]

    def _drawn(self, idx: int) -> PointSet:
        dense = self.dense_labels(idx)
        assert self.points is not None
        count = count_for(self.points, dense.shape)
        coords = sample_points(dense, count, self.points.sampling, self.points.seed, self.names[idx], self.ignore_index)
        return coords, dense[coords[:, 0], coords[:, 1]].astype(np.int64)

    def _file_point_set(self, idx: int) -> PointSet:
        assert self._file_points is not None and self.points is not None
        path = self.image_paths[idx]
        empty = (np.zeros((0, 2), np.int64), np.zeros(0, np.int64))  # an image the file has no points for
        coords, classes = self._file_points.get(pair_key(path.name), empty)
        height, width = image_size_of(path)
        check_points_inside(coords, (height, width), f"{self.points.file}: image {path.name}")
        if self.image_size and (height, width) != (self.image_size, self.image_size):
            scale = np.array([self.image_size / height, self.image_size / width])
            coords = np.minimum(((coords + 0.5) * scale).astype(np.int64), self.image_size - 1)
        return coords, classes

    def labels_of(self, idx: int) -> np.ndarray | None:
        """The training labels of image ``idx`` before augmentation: uint8 ``[H, W]`` (sparse with points)."""
        if self.points is not None:
            coords, classes = self.point_set(idx)
            side = self.image_size
            shape = (side, side) if side else image_size_of(self.image_paths[idx])
            return point_label_map(shape, coords, classes, self.ignore_index)
        return self.dense_labels(idx) if self.label_paths is not None else None

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, Target]:
        """Item ``key``: an index, or ``(index, epoch)`` as the trainer's batch sampler yields it."""
        idx, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        image, labels = self.load_image(idx), self.labels_of(idx)
        if any(self.flips):
            image, labels = self._augment(image, labels, zlib.crc32(f"{self.seed}/{epoch}/{idx}".encode()))
        target = {"image_id": torch.tensor(idx, dtype=torch.int64)}
        if labels is not None:
            target["labels"] = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))
        return to_chw_tensor(image), target

    def _augment(self, image: np.ndarray, labels: np.ndarray | None, seed: int
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """Flips and quarter turns of image ``[H, W, C]`` and labels ``[H, W]`` together, in the
        order and with the draws of :mod:`rsiseg.data.transforms`."""
        rng = np.random.default_rng(seed)
        hflip, vflip, rot90 = self.flips
        for axis, p in ((1, hflip), (0, vflip)):
            if p > 0 and rng.random() < p:
                image = np.flip(image, axis)
                labels = None if labels is None else np.flip(labels, axis)
        if rot90 > 0 and rng.random() < rot90:
            k = int(rng.integers(0, 4))
            image = np.rot90(image, k)
            labels = None if labels is None else np.rot90(labels, k)
        return image, labels

    def summary(self) -> str:
        """One paragraph: images, labelled points per image, ignored pixels, skipped files."""
        lines = [f"{len(self)} images in {self.images_dir}, {self.num_classes} classes"]
        if self.label_paths is not None:
            maps = [self.dense_labels(i) for i in range(len(self))]
            ignored = sum(int((m == self.ignore_index).sum()) for m in maps)
            total = sum(m.size for m in maps)
            lines.append(f"dense labels from {self.labels_dir}: {ignored} of {total} pixels ignored "
                         f"({100 * ignored / max(total, 1):.1f}%)")
        if self.points is not None:
            counts = [len(self.point_set(i)[0]) for i in range(len(self))]
            source = self.points.file or f"drawn {self.points.sampling}, seed {self.points.seed}"
            lines.append(f"labelled points per image ({source}): min {min(counts)}, mean {np.mean(counts):.1f}, "
                         f"max {max(counts)}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} non-image file(s), e.g. {self.skipped[0].name}")
        return "\n".join(lines)


def image_size_of(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the header; unreadable files raise :class:`DataError`."""
    try:
        return header_size(path)
    except Exception as err:  # PIL and tifffile raise many types for corrupt files
        raise DataError(f"{path}: cannot read the image header ({type(err).__name__}: {err})") from None
