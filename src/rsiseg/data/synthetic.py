"""Deterministic synthetic aerial instance-segmentation dataset in COCO format.

A scene is textured ground with fields, water, roads and sites (parking lots,
aprons, tank farms), clutter (trees, rocks, buildings) and five object classes
in the iSAID spirit: vehicles of a few pixels, ships on water, storage tanks and
planes. Every object casts a shadow that is not part of its mask. Most instances
have a bbox under 32 x 32 px, as in iSAID.

Image ``k`` of seed ``s`` depends only on ``(s, k)``, never on the number of images,
so a dataset can grow without changing the images it already had.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm import tqdm

from rsiseg.data.synthetic_shapes import (
    CATEGORY_IDS,
    Thing,
    cv_points,
    fill_mask,
    make_thing,
    paint_fields,
    paint_ground,
    paint_road,
    paint_shadows,
    paint_thing,
    paint_water,
    rect,
    road_mask,
    to_image,
)

CATEGORIES: list[dict] = [
    {"id": 1, "name": "small-vehicle", "supercategory": "vehicle"},
    {"id": 2, "name": "large-vehicle", "supercategory": "vehicle"},
    {"id": 3, "name": "ship", "supercategory": "vessel"},
    {"id": 4, "name": "storage-tank", "supercategory": "facility"},
    {"id": 5, "name": "plane", "supercategory": "aircraft"},
]
assert {c["name"]: c["id"] for c in CATEGORIES} == CATEGORY_IDS

_IMAGE_STREAM, _SPLIT_STREAM = 0, 1  # SeedSequence spawn keys: independent streams per purpose
STYLES = ("optical", "sar")
# Sites: side lengths (px, drawn per side) and grey tone of the pavement.
_SITE_DIMS = {"lot": (35.0, 80.0), "apron": (80.0, 140.0), "tanks": (45.0, 90.0)}
_SITE_TONES = {"lot": (0.40, 0.52), "apron": (0.58, 0.68), "tanks": (0.50, 0.60)}


@dataclass
class SynthSpec:
    """What :func:`write_synthetic_dataset` generates.

    Attributes:
        images: number of images.
        size: square image side in pixels.
        seed: non-negative seed; the same seed gives byte-identical files.
        val_fraction: share of images in the val split (at least one when ``images >= 2``).
        density: multiplies the number of objects per image (10-40 per 256^2 px at 1.0).
        object_scale: multiplies every object dimension (a ground-sampling-distance knob).
        empty_fraction: probability that an image holds no object at all.
        style: ``optical`` (RGB) or ``sar``: the same scenes seen as single-look-like SAR, grey
            intensity times Gamma-distributed speckle (2 looks), stored as 3 equal bands. A domain
            shift for adaptation experiments (e.g. PointSAM's, pretrained on optical scenes).
    """

    images: int = 40
    size: int = 256
    seed: int = 0
    val_fraction: float = 0.25
    density: float = 1.0
    object_scale: float = 1.0
    empty_fraction: float = 0.05
    style: str = "optical"

    def __post_init__(self) -> None:
        if self.images < 1 or self.size < 32 or self.seed < 0:
            raise ValueError(f"SynthSpec needs images >= 1, size >= 32, seed >= 0; got {self}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.empty_fraction <= 1):
            raise ValueError(f"SynthSpec fractions must lie in [0, 1); got {self}")
        if self.style not in STYLES:
            raise ValueError(f"SynthSpec style must be one of {', '.join(STYLES)}; got {self.style!r}")
        if self.density < 0 or self.object_scale <= 0:
            raise ValueError(f"SynthSpec needs density >= 0 and object_scale > 0; got {self}")


@dataclass
class _Source:
    """Proposes objects of one kind of place; ``region`` (uint8 ``[H, W]``) must hold them whole."""

    weight: float
    region: np.ndarray | None
    propose: Callable[[np.random.Generator], Thing | None]


def _site(rng: np.random.Generator, size: int, dims: tuple[float, float],
          blocked: np.ndarray) -> tuple[tuple[float, float, float], np.ndarray] | None:
    """Find a rotated ``length x width`` rectangle that avoids ``blocked``.

    Returns:
        ``((cx, cy, angle), uint8 [H, W] mask)``, or None when 15 tries found no room.
    """
    l, w = dims
    for _ in range(15):
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        angle = rng.uniform(0, np.pi)
        mask = np.zeros((size, size), np.uint8)
        fill_mask(mask, to_image(rect(-l / 2, l / 2, -w / 2, w / 2), cx, cy, angle))
        if mask.sum() > 0.6 * l * w and (mask & blocked).sum() < 0.02 * mask.sum():
            return (cx, cy, angle), mask
    return None


# ----------------------------------------------------------------------------- object sources


def _slot_source(kind: str, frame: tuple, slots: list, region: np.ndarray, weight: float, scale: float,
                 size: float | None = None, turn: float = 0.0) -> _Source:
    """Objects on a grid of local ``(u, v)`` slots of a site (parking stalls, tank pads)."""
    cx, cy, angle = frame

    def propose(rng: np.random.Generator) -> Thing | None:
        if not slots:
            return None
        u, v = slots.pop(int(rng.integers(len(slots))))
        x, y = to_image(np.array([[u, v]]), cx, cy, angle)[0] + rng.uniform(-0.4, 0.4, 2)
        heading = angle + turn + np.pi * rng.integers(2) + rng.normal(0, 0.04)
        return make_thing(kind, rng, x, y, heading, scale, size)

    return _Source(weight, region, propose)


def _sources(rng: np.random.Generator, canvas: np.ndarray, lum: np.ndarray, water: np.ndarray,
             paved: np.ndarray, roads: list, scale: float) -> tuple[list[_Source], np.ndarray]:
    """Paint the sites (parking lots, aprons, tank farms) and build every object source of a scene.

    Args:
        canvas, lum: float32 ``[H, W, 3]`` canvas and ``[H, W]`` luminance texture.
        water, paved: uint8 ``[H, W]`` masks of water and of roads with their shoulders.
        roads: ``(centreline, tangents, width)`` of each road.
        scale: object dimension multiplier.

    Returns:
        the sources and a uint8 ``[H, W]`` mask of water and sites, where clutter may not go.
    """
    size, area = canvas.shape[0], (canvas.shape[0] / 256) ** 2
    out: list[_Source] = []
    blocked = water.copy()
    plans = (["lot"] * rng.poisson(0.8 * area) + ["apron"] * rng.poisson(0.55 * area)
             + ["tanks"] * rng.poisson(0.5 * area))
    if not plans and rng.random() < 0.7:  # scenes of bare land with scattered objects look fake
        plans = [str(rng.choice(["lot", "apron", "tanks"]))]
    for plan in plans:
        trucks = plan == "lot" and rng.random() < 0.3
        dims = rng.uniform(*_SITE_DIMS[plan], 2) * scale
        found = _site(rng, size, tuple(dims), blocked)
        if found is None:
            continue
        frame, mask = found
        m = mask.astype(bool)
        tone = rng.uniform(*_SITE_TONES[plan])
        canvas[m] = np.float32([tone, tone * 0.99, tone * 0.95]) * lum[m][:, None]
        blocked |= mask
        inner = cv2.erode(mask, np.ones((3, 3), np.uint8))
        l, w = dims
        if plan == "lot":
            depth, pitch = np.array((24.0, 9.5) if trucks else (11.0, 5.6)) * scale
            slots = [(-l / 2 + pitch * (i + 0.5), -w / 2 + depth * (j + 0.5))
                     for j in range(int(w // depth)) for i in range(int(l // pitch))]
            kind = "large-vehicle" if trucks else "small-vehicle"
            out.append(_slot_source(kind, frame, slots, inner, 4.0, scale, turn=np.pi / 2))
        elif plan == "tanks":
            diameter = rng.uniform(9, 26)
            pitch = (diameter + rng.uniform(3, 8)) * scale
            slots = [(u, v) for u in np.arange(-l / 2 + pitch / 2, l / 2 - pitch / 2 + 1e-6, pitch)
                     for v in np.arange(-w / 2 + pitch / 2, w / 2 - pitch / 2 + 1e-6, pitch)]
            out.append(_slot_source("storage-tank", frame, slots, inner, 2.0, scale,
                                    diameter * rng.uniform(0.92, 1.08)))
        else:
            # Default arguments bind this apron's frame: a plain closure would see the last one.
            def plane_at(rng: np.random.Generator, frame: tuple = frame, l: float = l, w: float = w) -> Thing:
                x, y = to_image(rng.uniform(-0.5, 0.5, (1, 2)) * [l, w], *frame)[0]
                parked = frame[2] + rng.integers(4) * np.pi / 2 + rng.normal(0, 0.15)  # in rows, mostly
                heading = parked if rng.random() < 0.6 else rng.uniform(0, 2 * np.pi)
                return make_thing("plane", rng, x, y, heading, scale)

            out.append(_Source(2.5, inner, plane_at))
    lanes = np.zeros_like(blocked)
    for line, _, width in roads:
        lanes |= road_mask(size, line, width)
    lanes &= 1 - blocked  # no traffic through sites, and none on bridges either
    for line, tangent, width in roads:
        out.append(_Source(1.5, lanes, _road_proposer(line, tangent, width, scale)))
    water_core = cv2.erode(water & (1 - paved) & (1 - (blocked - water)), np.ones((5, 5), np.uint8))
    ys, xs = np.nonzero(water_core)
    if len(xs):
        def ship_at(rng: np.random.Generator) -> Thing:
            k = int(rng.integers(len(xs)))
            return make_thing("ship", rng, xs[k] + 0.5, ys[k] + 0.5, rng.uniform(0, 2 * np.pi), scale)

        out.append(_Source(2.0 * min(1.0, len(xs) / (0.1 * size * size)) + 0.5, water_core, ship_at))

    def scatter(rng: np.random.Generator) -> Thing:
        kind = ["small-vehicle", "large-vehicle", "storage-tank"][rng.choice(3, p=[0.45, 0.35, 0.2])]
        return make_thing(kind, rng, *rng.uniform(0, size, 2), rng.uniform(0, 2 * np.pi), scale)

    out.append(_Source(0.6, (1 - blocked) & (1 - paved), scatter))
    return out, blocked


def _road_proposer(line: np.ndarray, tangent: np.ndarray, width: float,
                   scale: float) -> Callable[[np.random.Generator], Thing]:
    """Vehicles in both lanes, often in convoys (the next one a car length behind the last)."""
    last: dict = {}

    def propose(rng: np.random.Generator) -> Thing:
        if last and rng.random() < 0.6:
            k, lane = last["k"] + int(rng.integers(11, 20) * scale) * last["dir"], last["lane"]
        else:
            k, lane = int(rng.integers(len(line))), int(rng.integers(2))
        k = int(np.clip(k, 0, len(line) - 1))
        sign = 1 if lane else -1
        x, y = line[k] + sign * width / 4 * np.array([-tangent[k, 1], tangent[k, 0]])
        heading = np.arctan2(tangent[k, 1], tangent[k, 0]) + (0 if lane else np.pi)
        last.update(k=k, lane=lane, dir=sign)
        kind = "large-vehicle" if rng.random() < 0.2 else "small-vehicle"
        return make_thing(kind, rng, x, y, heading + rng.normal(0, 0.03), scale)

    return propose


# ----------------------------------------------------------------------------- scene


class _Placer:
    """Keeps things inside the image, inside their region and 1 px apart from each other."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.occupied = np.zeros((size, size), np.uint8)

    def fits(self, t: Thing, region: np.ndarray | None) -> bool:
        """Whether ``t`` lies inside the image and ``region`` (uint8 ``[H, W]``) and touches nothing."""
        if t.poly.min() < 0.5 or t.poly.max() > self.size - 0.5:
            return False
        x0, y0 = np.floor(t.poly.min(0)).astype(int)
        x1, y1 = np.minimum(np.ceil(t.poly.max(0)).astype(int) + 1, self.size)
        patch = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(patch, cv_points(t.poly, 1.0, (x0, y0)), 1, cv2.LINE_8, 4)
        if (patch & self.occupied[y0:y1, x0:x1]).any():
            return False
        return region is None or not (patch > region[y0:y1, x0:x1]).any()

    def add(self, t: Thing) -> None:
        """Reserve ``t``'s outline and a one-pixel margin around it."""
        # The margin keeps a strip of ground between neighbours, so their masks never touch.
        fill_mask(self.occupied, t.poly)
        cv2.polylines(self.occupied, cv_points(t.poly), True, 1, 3, cv2.LINE_8, 4)


def _clutter(rng: np.random.Generator, placer: _Placer, free: np.ndarray, area: float) -> list[Thing]:
    """Buildings, tree clumps and rocks on free land: distractors that are never annotated."""
    size, things = placer.size, []
    for _ in range(rng.poisson(2.5 * area)):
        t = make_thing("building", rng, *rng.uniform(0, size, 2), rng.uniform(0, np.pi))
        if placer.fits(t, free):
            placer.add(t)
            things.append(t)
    clumps = [rng.uniform(0, size, 2) for _ in range(rng.poisson(3 * area))]
    trees = [c + rng.normal(0, rng.uniform(5, 12), 2) for c in clumps for _ in range(rng.integers(4, 16))]
    trees += [rng.uniform(0, size, 2) for _ in range(rng.poisson(12 * area))]
    rocks = [rng.uniform(0, size, 2) for _ in range(rng.poisson(15 * area))]
    small = [make_thing("tree", rng, x, y, rng.uniform(0, 2 * np.pi)) for x, y in trees]
    small += [make_thing("rock", rng, x, y, rng.uniform(0, 2 * np.pi)) for x, y in rocks]
    small = [t for t in small if placer.fits(t, free)]  # checked before adding: crowns may overlap
    for t in small:
        placer.add(t)
    return things + small


def generate_scene(rng: np.random.Generator, size: int, *, density: float = 1.0, object_scale: float = 1.0,
                   empty_prob: float = 0.05) -> tuple[np.ndarray, list[dict]]:
    """Paint one synthetic aerial scene.

    Args:
        rng: the only source of randomness; the same generator state gives the same scene.
        size: square image side in pixels; object counts scale with the area
            (10-40 objects per 256 x 256 px at ``density`` 1), object sizes do not.
        density: multiplies the number of objects.
        object_scale: multiplies the object dimensions.
        empty_prob: probability of a scene without any object.

    Returns:
        image: RGB ``uint8 [H, W, 3]`` with ``H = W = size``.
        instances: ``{"category_id": int in 1..5, "polygon": [x0, y0, x1, y1, ...]}``, the
        polygon in COCO pixel coordinates (pixel ``(c, r)`` covers ``[c, c+1) x [r, r+1)``),
        rounded to 0.01 px, fully inside the image and at least 3 vertices long.
    """
    area = (size / 256) ** 2
    canvas, lum = paint_ground(rng, size)
    paint_fields(rng, canvas, lum, area)
    water = paint_water(rng, canvas, lum) if rng.random() < 0.45 else np.zeros((size, size), np.uint8)
    roads = [paint_road(rng, canvas, lum) for _ in range(rng.choice([0, 1, 1, 2, 2, 3]) if size >= 64 else 0)]
    paved = np.zeros_like(water)
    for line, _, width in roads:
        paved |= road_mask(size, line, width + 4)
    sources, blocked = _sources(rng, canvas, lum, water, paved, roads, object_scale)
    placer = _Placer(size)
    clutter = _clutter(rng, placer, (1 - blocked) & (1 - paved), area)

    budget = 0 if rng.random() < empty_prob else int(round(rng.integers(10, 41) * area * density))
    objects, fails = [], [0] * len(sources)
    for _ in range(40 * budget):
        live = [i for i, f in enumerate(fails) if f < 40]  # a source that keeps failing is full
        if len(objects) >= budget or not live:
            break
        weights = np.array([sources[i].weight for i in live])
        i = live[int(rng.choice(len(live), p=weights / weights.sum()))]
        t = sources[i].propose(rng)
        if t is not None and placer.fits(t, sources[i].region):
            placer.add(t)
            objects.append(t)
            fails[i] = 0
        else:
            fails[i] += 1

    sun = rng.uniform(0, 2 * np.pi)
    offset = rng.uniform(0.7, 1.3) * np.array([np.cos(sun), np.sin(sun)])
    paint_shadows(canvas, clutter + objects, offset, rng.uniform(0.4, 0.6))
    for t in clutter + objects:
        paint_thing(canvas, t)
    # A slight blur and sensor noise: edges look optical, not vector-drawn.
    canvas = cv2.GaussianBlur(canvas, (0, 0), 0.55)
    canvas = canvas * rng.uniform(0.92, 1.08) + rng.normal(0, 0.012, canvas.shape).astype(np.float32)
    image = np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)
    instances = [{"category_id": t.category_id, "polygon": t.poly.ravel().tolist()} for t in objects]
    return image, instances


def sar_look(image: np.ndarray, rng: np.random.Generator, looks: int = 2) -> np.ndarray:
    """An optical scene as a speckled SAR-like intensity image.

    Args:
        image: RGB ``uint8 [H, W, 3]``.
        rng: draws the speckle.
        looks: the number of looks L: speckle is Gamma(L, 1/L), mean 1 (fewer looks, more speckle).

    Returns:
        ``uint8 [H, W, 3]``, three equal bands.
    """
    grey = image.astype(np.float32).mean(axis=2) / 255.0
    speckled = grey ** 1.5 * rng.gamma(looks, 1.0 / looks, grey.shape).astype(np.float32)
    grey8 = np.clip(np.sqrt(speckled) * 255 + 0.5, 0, 255).astype(np.uint8)  # amplitude, as SAR products show it
    return np.repeat(grey8[:, :, None], 3, axis=2)


# ----------------------------------------------------------------------------- COCO files


def _annotation(polygon: list[float], category_id: int, ann_id: int, image_id: int, size: int) -> dict:
    """COCO annotation of one polygon: area by the shoelace formula, bbox clipped to the image."""
    xs, ys = np.array(polygon[0::2]), np.array(polygon[1::2])
    area = 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))
    x0, y0 = max(0.0, xs.min()), max(0.0, ys.min())
    x1, y1 = min(float(size), xs.max()), min(float(size), ys.max())
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "segmentation": [[round(v, 2) for v in polygon]], "area": round(area, 2),
            "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)], "iscrowd": 0}


def split_indices(images: int, val_fraction: float, seed: int) -> set[int]:
    """Indices of the val images: ``round(val_fraction * images)`` of them, >= 1 when ``images >= 2``."""
    n_val = int(round(val_fraction * images))
    n_val = min(max(n_val, 1), images - 1) if images >= 2 else 0
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SPLIT_STREAM,)))
    return {int(i) for i in rng.permutation(images)[:n_val]}


def write_synthetic_dataset(out_dir: str | Path, spec: SynthSpec, progress: bool = True) -> dict[str, Path]:
    """Write ``spec.images`` PNG scenes and the train/val COCO files under ``out_dir``.

    Layout: ``images/synth_00000.png ...`` and ``annotations/instances_{train,val}.json``.
    Image and annotation ids are unique across both files; ``file_name`` is relative to
    ``images/``. Images without objects are kept. Same ``spec`` -> byte-identical files.

    Returns:
        ``{"train": train_json, "val": val_json, "images": images_dir}``.
    """
    out = Path(out_dir)
    images_dir, ann_dir = out / "images", out / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    val = split_indices(spec.images, spec.val_fraction, spec.seed)
    splits: dict[str, dict[str, list]] = {s: {"images": [], "annotations": []} for s in ("train", "val")}
    ann_id = 1
    for index in tqdm(range(spec.images), desc="synthetic scenes", unit="img", disable=not progress):
        rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(_IMAGE_STREAM, index)))
        image, instances = generate_scene(rng, spec.size, density=spec.density,
                                          object_scale=spec.object_scale, empty_prob=spec.empty_fraction)
        if spec.style == "sar":
            image = sar_look(image, rng)
        file_name = f"synth_{index:05d}.png"
        ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"could not encode {file_name}")
        (images_dir / file_name).write_bytes(png.tobytes())
        split = splits["val" if index in val else "train"]
        split["images"].append({"id": index + 1, "file_name": file_name, "height": spec.size, "width": spec.size})
        for inst in instances:
            split["annotations"].append(_annotation(inst["polygon"], inst["category_id"], ann_id, index + 1, spec.size))
            ann_id += 1
    paths = {}
    for name, split in splits.items():
        info = {"description": "rsiseg synthetic aerial scenes", "version": "1", "seed": spec.seed,
                "size": spec.size, "split": name}
        coco = {"info": info, "licenses": [], **split, "categories": CATEGORIES}
        paths[name] = ann_dir / f"instances_{name}.json"
        paths[name].write_text(json.dumps(coco, separators=(",", ":")))
    return {"train": paths["train"], "val": paths["val"], "images": images_dir}
