"""Painters of the synthetic aerial scenes of :mod:`rsiseg.data.synthetic`: objects, clutter, terrain.

Conventions:

* a polygon is a float ``[K, 2]`` array of ``(x, y)`` in COCO pixel coordinates,
  where pixel ``(col, row)`` covers ``[col, col + 1) x [row, row + 1)``;
* a canvas is a float32 ``[H, W, 3]`` RGB image in [0, 1] while a scene is painted;
* an object's local frame has ``x`` along its heading (nose, bow, front) and its
  origin at the object's centre; ``angle`` rotates it, in radians.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CATEGORY_IDS = {"small-vehicle": 1, "large-vehicle": 2, "ship": 3, "storage-tank": 4, "plane": 5}
SHIFT = 4  # cv2 fixed-point bits: vertices are drawn at 1/16 px precision
SUPERSAMPLE = 8  # coverage is rendered at 8x: "coverage >= 0.5" then nearly equals the COCO mask

# (RGB colour, probability) tables; bright and saturated colours dominate so that
# objects stand out from asphalt, soil and water, as they do in real imagery.
CAR_COLOURS = (
    ((0.93, 0.93, 0.91), 0.30), ((0.76, 0.77, 0.79), 0.18), ((0.09, 0.09, 0.10), 0.12),
    ((0.75, 0.13, 0.10), 0.14), ((0.15, 0.26, 0.62), 0.14), ((0.88, 0.77, 0.20), 0.06),
    ((0.22, 0.48, 0.30), 0.06),
)
TRAILER_COLOURS = (
    ((0.94, 0.94, 0.93), 0.40), ((0.80, 0.81, 0.80), 0.18), ((0.92, 0.55, 0.14), 0.12),
    ((0.88, 0.80, 0.25), 0.08), ((0.20, 0.36, 0.68), 0.11), ((0.68, 0.15, 0.12), 0.11),
)
HULL_COLOURS = (
    ((0.93, 0.93, 0.91), 0.45), ((0.64, 0.66, 0.68), 0.25),
    ((0.60, 0.18, 0.13), 0.15), ((0.20, 0.28, 0.50), 0.15),
)
TANK_COLOURS = (((0.94, 0.94, 0.91), 0.5), ((0.90, 0.87, 0.80), 0.3), ((0.82, 0.84, 0.87), 0.2))
PLANE_COLOURS = (((0.95, 0.95, 0.96), 0.6), ((0.86, 0.87, 0.89), 0.3), ((0.93, 0.90, 0.84), 0.1))
ROOF_COLOURS = (
    ((0.62, 0.31, 0.22), 0.35), ((0.50, 0.50, 0.52), 0.30),
    ((0.34, 0.33, 0.33), 0.20), ((0.70, 0.66, 0.58), 0.15),
)
GLASS = (0.10, 0.12, 0.15)


@dataclass
class Thing:
    """One painted item: an object instance (``category_id`` 1..5) or clutter (0).

    Attributes:
        kind: painter name, e.g. ``"small-vehicle"`` or ``"tree"``.
        category_id: COCO category id, 0 for clutter that is never annotated.
        cx, cy, angle: placement of the local frame (pixels, radians).
        dims: ``(length, width)`` of the local outline in pixels.
        poly: float ``[K, 2]`` outline in image coordinates, rounded to 0.01 px so that
            the painted object and the written annotation are the same polygon.
        height: shadow length in pixels (before the scene's sun factor).
        colours: main colour first, then painter-specific secondary colours.
    """

    kind: str
    category_id: int
    cx: float
    cy: float
    angle: float
    dims: tuple[float, float]
    poly: np.ndarray
    height: float
    colours: tuple[tuple[float, float, float], ...]

    def to_image(self, local: np.ndarray) -> np.ndarray:
        """Map local ``[K, 2]`` points of this thing's frame to image coordinates."""
        return to_image(local, self.cx, self.cy, self.angle)


def to_image(local: np.ndarray, cx: float, cy: float, angle: float) -> np.ndarray:
    """Rotate ``[K, 2]`` local points by ``angle`` and move the origin to ``(cx, cy)``."""
    c, s = np.cos(angle), np.sin(angle)
    x, y = local[:, 0], local[:, 1]
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def cv_points(poly: np.ndarray, scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)) -> list[np.ndarray]:
    """Fixed-point ``int32`` points for ``cv2.fillPoly(..., shift=SHIFT)``.

    cv2 puts pixel centres on integers while COCO puts them on ``+0.5``, hence the
    half-pixel shift.
    """
    pts = (poly - np.asarray(offset)) * scale - 0.5
    return [np.round(pts * (1 << SHIFT)).astype(np.int32)]


def fill_mask(mask: np.ndarray, poly: np.ndarray, value: int = 1) -> None:
    """Fill ``poly`` into a ``uint8 [H, W]`` mask in place (hard edges, cheap)."""
    cv2.fillPoly(mask, cv_points(poly), value, cv2.LINE_8, shift=SHIFT)


def coverage(poly: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Fraction of each pixel of the window ``[y0:y0+h, x0:x0+w]`` covered by ``poly``.

    Returns:
        float32 ``[h, w]`` in [0, 1]; this is the antialiasing alpha of the object.
    """
    big = np.zeros((h * SUPERSAMPLE, w * SUPERSAMPLE), np.uint8)
    cv2.fillPoly(big, cv_points(poly, SUPERSAMPLE, (x0, y0)), 255, cv2.LINE_8, shift=SHIFT)
    return cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def window(poly: np.ndarray, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Integer window ``(x0, y0, w, h)`` holding ``poly``, clipped to the image; None if outside."""
    x0, y0 = np.floor(poly.min(0)).astype(int)
    x1, y1 = np.ceil(poly.max(0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    return int(x0), int(y0), int(x1 - x0), int(y1 - y0)


def paint(canvas: np.ndarray, poly: np.ndarray, colour: tuple[float, float, float] | np.ndarray) -> None:
    """Alpha-blend an antialiased ``poly`` of one colour onto a float ``[H, W, 3]`` canvas."""
    win = window(poly, canvas.shape[0], canvas.shape[1])
    if win is None:
        return
    x0, y0, w, h = win
    alpha = coverage(poly, x0, y0, w, h)[..., None]
    region = canvas[y0 : y0 + h, x0 : x0 + w]
    region += alpha * (np.asarray(colour, np.float32) - region)


def rect(x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    """Axis-aligned local rectangle ``[4, 2]``."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def chamfered_rect(length: float, width: float, chamfer: float) -> np.ndarray:
    """Centred ``length x width`` rectangle with cut corners (a car seen from above), ``[8, 2]``."""
    a, b = length / 2, width / 2
    return np.array([[a, -b + chamfer], [a, b - chamfer], [a - chamfer, b], [-a + chamfer, b],
                     [-a, b - chamfer], [-a, -b + chamfer], [-a + chamfer, -b], [a - chamfer, -b]])


def hull(length: float, width: float) -> np.ndarray:
    """Ship hull with a square stern at ``-x`` and a pointed bow at ``+x``, ``[9, 2]``."""
    a, b = length / 2, width / 2
    return np.array([[-a, -0.8 * b], [-0.9 * a, -b], [0.35 * a, -b], [0.75 * a, -0.6 * b], [a, 0.0],
                     [0.75 * a, 0.6 * b], [0.35 * a, b], [-0.9 * a, b], [-a, 0.8 * b]])


def circle(radius: float, n: int | None = None) -> np.ndarray:
    """Regular ``n``-gon approximating a circle, ``[n, 2]``; ``n`` grows with the radius."""
    n = n or max(12, int(2.5 * radius))
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def blob(rng: np.random.Generator, radius: float, n: int = 9, jitter: float = 0.25) -> np.ndarray:
    """Irregular round outline (tree crown, rock), ``[n, 2]``."""
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = radius * (1 + jitter * rng.uniform(-1, 1, n))
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def plane(span: float, length: float) -> np.ndarray:
    """Airliner outline seen from above, nose at ``+x``: fuselage, swept wings and tailplane.

    Built as a hand-made upper half mirrored to the lower one, so the outline is one
    simple polygon (no union needed) of 19 vertices.
    """
    a, f = length / 2, max(0.055 * span, 1.1)
    root, chord, sweep, tip = 0.05 * length, 0.22 * length, 0.16 * length, 0.08 * length
    tail_root, tail_span = -a + 0.17 * length, 0.36 * span / 2
    upper = [
        [a - 0.09 * length, f], [root, f], [root - sweep, span / 2], [root - sweep - tip, span / 2],
        [root - chord, f], [tail_root, 0.8 * f], [-a + 0.06 * length, tail_span],
        [-a + 0.01 * length, tail_span], [-a + 0.02 * length, 0.6 * f],
    ]
    upper = np.array(upper)
    lower = upper[::-1] * np.array([1.0, -1.0])
    return np.concatenate([[[a, 0.0]], upper, [[-a, 0.0]], lower])


def pick_colour(rng: np.random.Generator, table: tuple, jitter: float = 0.04) -> tuple[float, float, float]:
    """Draw a colour from a ``((r, g, b), p)`` table and jitter each channel a little."""
    probs = np.array([p for _, p in table])
    base = np.array(table[rng.choice(len(table), p=probs / probs.sum())][0])
    # Mostly a brightness change: independent channel noise would tint whites pink or green.
    shift = rng.uniform(-jitter, jitter) + rng.uniform(-jitter / 4, jitter / 4, 3)
    return tuple(np.clip(base + shift, 0, 1).tolist())


def make_thing(kind: str, rng: np.random.Generator, cx: float, cy: float, angle: float,
               scale: float = 1.0, size: float | None = None) -> Thing:
    """Draw the dimensions and colours of one ``kind`` placed at ``(cx, cy, angle)``.

    Args:
        kind: a category name of :data:`CATEGORY_IDS` or ``"tree"``, ``"rock"``, ``"building"``.
        scale: multiplies every object dimension (GSD knob of the generator).
        size: forces the main dimension (tank diameter in a tank farm), in pixels.
    """
    s = scale
    if kind == "small-vehicle":
        length = (size or rng.uniform(6.0, 10.0)) * s
        width = length * rng.uniform(0.44, 0.52)
        local, height = chamfered_rect(length, width, 0.22 * width), 1.5
        colours = (pick_colour(rng, CAR_COLOURS), GLASS)
    elif kind == "large-vehicle":
        length = (size or rng.uniform(12.0, 22.0)) * s
        width = min(length * rng.uniform(0.30, 0.40), 7.5 * s)
        local, height = chamfered_rect(length, width, 0.12 * width), 2.5
        colours = (pick_colour(rng, TRAILER_COLOURS), pick_colour(rng, CAR_COLOURS))
    elif kind == "ship":
        length = (size or 15.0 + 25.0 * rng.beta(1.6, 2.4)) * s
        width = length * rng.uniform(0.17, 0.26)
        local, height = hull(length, width), 2.0
        colours = (pick_colour(rng, HULL_COLOURS), pick_colour(rng, HULL_COLOURS), (0.95, 0.95, 0.95))
    elif kind == "storage-tank":
        length = width = (size or rng.uniform(8.0, 24.0)) * s
        local, height = circle(length / 2), 1.0 + 0.22 * length
        colours = (pick_colour(rng, TANK_COLOURS),)
    elif kind == "plane":
        width = (size or rng.uniform(20.0, 45.0)) * s
        length = width * rng.uniform(0.82, 1.02)
        local, height = plane(width, length), 3.5
        colours = (pick_colour(rng, PLANE_COLOURS, 0.02), GLASS)
    elif kind == "tree":
        length = width = rng.uniform(3.0, 9.0)
        local, height = blob(rng, length / 2), rng.uniform(1.5, 3.0)
        green = np.array([0.13, 0.24, 0.10]) + rng.uniform(-0.04, 0.04, 3)
        colours = (tuple(green.tolist()), tuple((green * 1.35).tolist()))
    elif kind == "rock":
        length = width = rng.uniform(2.0, 4.5)
        local, height = blob(rng, length / 2, n=7, jitter=0.35), 0.8
        colours = (tuple((np.array([0.45, 0.42, 0.38]) + rng.uniform(-0.08, 0.08)).tolist()),)
    elif kind == "building":
        length, width = rng.uniform(14.0, 34.0), rng.uniform(9.0, 18.0)
        local, height = rect(-length / 2, length / 2, -width / 2, width / 2), rng.uniform(3.0, 6.0)
        roof = np.array(pick_colour(rng, ROOF_COLOURS))
        colours = (tuple(roof.tolist()), tuple((roof * 0.78).tolist()))
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}")
    poly = np.round(to_image(local, cx, cy, angle), 2)
    return Thing(kind, CATEGORY_IDS.get(kind, 0), cx, cy, angle, (length, width), poly, height, colours)


def paint_thing(canvas: np.ndarray, t: Thing) -> None:
    """Paint ``t``'s body and details; every detail lies inside the outline ``t.poly``."""
    length, width = t.dims
    a, b = length / 2, width / 2
    paint(canvas, t.poly, t.colours[0])
    if t.kind == "small-vehicle":
        if sum(t.colours[0]) > 0.6:  # glass is invisible on a black car
            paint(canvas, t.to_image(rect(0.08 * a, 0.5 * a, -0.75 * b, 0.75 * b)), GLASS)
            paint(canvas, t.to_image(rect(-0.8 * a, -0.55 * a, -0.7 * b, 0.7 * b)), GLASS)
    elif t.kind == "large-vehicle":
        paint(canvas, t.to_image(rect(0.62 * a, 0.95 * a, -0.9 * b, 0.9 * b)), t.colours[1])
        paint(canvas, t.to_image(rect(0.52 * a, 0.6 * a, -0.9 * b, 0.9 * b)), (0.15, 0.15, 0.15))
    elif t.kind == "ship":
        deck = np.array(t.colours[1]) * 0.5 + np.array(t.colours[0]) * 0.5
        paint(canvas, t.to_image(hull(0.8 * length, 0.6 * width) + [0.03 * length, 0]), tuple(deck))
        paint(canvas, t.to_image(rect(-0.85 * a, -0.5 * a, -0.7 * b, 0.7 * b)), t.colours[2])
    elif t.kind == "storage-tank":
        # A darker rim (the tank wall) and a faint seal ring of the floating roof.
        rim = max(1.0, 0.12 * a)
        top = np.array(t.colours[0])
        paint(canvas, t.poly, tuple(top * 0.58))
        paint(canvas, t.to_image(circle(a - rim)), tuple(top))
        paint(canvas, t.to_image(circle(0.62 * a)), tuple(top * 0.9))
        paint(canvas, t.to_image(circle(0.62 * a - 0.6)), tuple(top * 0.97))
    elif t.kind == "plane":
        paint(canvas, t.to_image(rect(0.36 * length, 0.43 * length, -0.6, 0.6)), GLASS)
        for side in (-1, 1):
            y = side * 0.32 * width / 2
            paint(canvas, t.to_image(rect(-0.02 * length, 0.08 * length, y - 0.9, y + 0.9)), (0.55, 0.56, 0.58))
    elif t.kind == "tree":
        paint(canvas, t.to_image(circle(0.55 * a) + [-0.2 * a, -0.2 * a]), t.colours[1])
    elif t.kind == "building":
        # Two roof planes with a ridge along the long axis; one faces away from the sun.
        paint(canvas, t.to_image(rect(-a, a, 0.0, b)), t.colours[1])


def paint_shadows(canvas: np.ndarray, things: list[Thing], offset: np.ndarray, strength: float) -> None:
    """Darken the ground under every thing's outline moved by ``height * offset``.

    All shadows are drawn before any body, so a shadow never darkens an object and
    the object mask stays the object's outline alone.

    Args:
        canvas: float32 ``[H, W, 3]`` in [0, 1], modified in place.
        offset: ``[2]`` shadow displacement per pixel of height (sun direction and elevation).
        strength: fraction of light removed inside a shadow, in (0, 1).
    """
    shade = np.zeros(canvas.shape[:2], np.uint8)
    for t in things:
        fill_mask(shade, t.poly + t.height * offset, 255)
    soft = cv2.GaussianBlur(shade, (0, 0), 0.6).astype(np.float32) / 255.0
    canvas *= 1.0 - strength * soft[..., None]


# ----------------------------------------------------------------------------- terrain

GROUND = ((0.50, 0.45, 0.34), (0.45, 0.46, 0.30), (0.31, 0.40, 0.22), (0.64, 0.58, 0.46))
FIELDS = ((0.27, 0.42, 0.17), (0.70, 0.62, 0.36), (0.44, 0.34, 0.25), (0.40, 0.46, 0.24), (0.55, 0.52, 0.30))
SHALLOW, DEEP, SAND = np.array((0.20, 0.33, 0.32)), np.array((0.08, 0.17, 0.21)), np.array((0.68, 0.63, 0.50))


def fractal_noise(rng: np.random.Generator, size: int, feature_px: float, octaves: int) -> np.ndarray:
    """Value noise summed over octaves; float32 ``[size, size]``, about zero mean, unit std."""
    total, norm, amp = np.zeros((size, size), np.float32), 0.0, 1.0
    for _ in range(octaves):
        cells = max(2, int(round(size / feature_px))) + 1
        grid = rng.standard_normal((cells, cells)).astype(np.float32)
        total += amp * cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
        norm, amp, feature_px = norm + amp**2, amp * 0.55, feature_px / 2
    return total / np.sqrt(norm)


def paint_ground(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two ground tones (soil, grass, sand) mixed at a large scale, textured at several scales.

    Returns:
        the float32 ``[size, size, 3]`` canvas and its float32 ``[size, size]`` luminance
        texture (about 1), which later layers reuse so that they share the ground's grain.
    """
    i, j = rng.choice(len(GROUND), 2, replace=False)
    mix = 1 / (1 + np.exp(-1.8 * fractal_noise(rng, size, 150, 3)))[..., None]
    canvas = (np.float32(GROUND[i]) * (1 - mix) + np.float32(GROUND[j]) * mix).astype(np.float32)
    lum = 1 + 0.07 * fractal_noise(rng, size, 60, 4) + 0.03 * rng.standard_normal((size, size)).astype(np.float32)
    canvas *= lum[..., None]
    return canvas, lum


def paint_fields(rng: np.random.Generator, canvas: np.ndarray, lum: np.ndarray, area: float) -> None:
    """Paint about ``2.5 * area`` crop fields (rectangles on one cadastral grid, with row stripes)."""
    size = canvas.shape[0]
    axis = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(rng.poisson(2.5 * area)):
        angle = axis + rng.choice([0, np.pi / 2]) + rng.uniform(-0.05, 0.05)
        l, w = rng.uniform(40, 140, 2)
        poly = to_image(rect(-l / 2, l / 2, -w / 2, w / 2), *rng.uniform(0, size, 2), angle)
        mask = np.zeros((size, size), np.uint8)
        fill_mask(mask, poly)
        m = mask.astype(bool)
        period, amp = rng.uniform(3, 7), rng.uniform(0.03, 0.12)
        stripes = 1 + amp * np.sin(2 * np.pi * (xx[m] * np.cos(angle) + yy[m] * np.sin(angle)) / period)
        colour = np.float32(FIELDS[rng.integers(len(FIELDS))]) + rng.uniform(-0.03, 0.03, 3).astype(np.float32)
        canvas[m] = colour * (stripes * lum[m])[:, None]


def paint_water(rng: np.random.Generator, canvas: np.ndarray, lum: np.ndarray) -> np.ndarray:
    """Paint irregular water (lakes or a coast) with a sandy shore; returns the uint8 water mask."""
    size = canvas.shape[0]
    field = fractal_noise(rng, size, 180, 3)
    if rng.random() < 0.5:  # a ramp pushes water to one side of the image: a coast
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
        phi = rng.uniform(0, 2 * np.pi)
        field += rng.uniform(1.5, 3.5) * (xx * np.cos(phi) + yy * np.sin(phi))
    water = (field > np.quantile(field, 1 - rng.uniform(0.12, 0.35))).astype(np.uint8)
    water = cv2.morphologyEx(water, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    shore = cv2.dilate(water, np.ones((5, 5), np.uint8)).astype(bool) & ~water.astype(bool)
    canvas[shore] = canvas[shore] * 0.4 + np.float32(SAND) * 0.6
    depth = np.clip(cv2.distanceTransform(water, cv2.DIST_L2, 3) / 12, 0, 1)[..., None]
    colour = (SHALLOW * (1 - depth) + DEEP * depth).astype(np.float32) * (1 + 0.5 * (lum - 1))[..., None]
    canvas[water.astype(bool)] = colour[water.astype(bool)]
    return water


def paint_road(rng: np.random.Generator, canvas: np.ndarray, lum: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Paint one straight or gently curved road across the image.

    Returns:
        centreline float ``[M, 2]`` sampled every pixel, its unit tangents ``[M, 2]`` and its width.
    """
    size = canvas.shape[0]
    centre, phi = rng.uniform(0.15, 0.85, 2) * size, rng.uniform(0, np.pi)
    d, n = np.array([np.cos(phi), np.sin(phi)]), np.array([-np.sin(phi), np.cos(phi)])
    bend = rng.uniform(-0.35, 0.35) * size if rng.random() < 0.5 else 0.0
    t = np.linspace(0, 1, 64)[:, None]
    p0, p1, p2 = centre - 1.3 * size * d, centre + bend * n, centre + 1.3 * size * d
    coarse = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2  # quadratic Bezier
    seg = np.r_[0, np.cumsum(np.linalg.norm(np.diff(coarse, axis=0), axis=1))]
    s = np.arange(0, seg[-1], 1.0)
    line = np.stack([np.interp(s, seg, coarse[:, 0]), np.interp(s, seg, coarse[:, 1])], axis=1)
    tangent = np.gradient(line, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    width = int(rng.integers(9, 17))
    grey = rng.uniform(0.30, 0.42)
    pts = cv_points(line)
    cv2.polylines(canvas, pts, False, (0.55, 0.52, 0.46), width + 3, cv2.LINE_AA, 4)  # gravel shoulders
    mask = np.zeros(canvas.shape[:2], np.uint8)
    cv2.polylines(mask, pts, False, 1, width, cv2.LINE_8, 4)
    m = mask.astype(bool)
    canvas[m] = np.float32([grey, grey, grey * 0.97]) * lum[m][:, None]
    dashes = (s % 12) < 5  # dashed centre line, one dash every 12 px
    for k in np.flatnonzero(dashes[:-1] & dashes[1:]):
        cv2.polylines(canvas, cv_points(line[k : k + 2]), False, (0.82, 0.82, 0.78), 1, cv2.LINE_AA, 4)
    return line, tangent, width


def road_mask(size: int, line: np.ndarray, width: float) -> np.ndarray:
    """uint8 ``[size, size]`` mask of a road of ``width`` px along ``line``, one pixel in from its edges."""
    mask = np.zeros((size, size), np.uint8)
    cv2.polylines(mask, cv_points(line), False, 1, int(width), cv2.LINE_8, 4)
    return cv2.erode(mask, np.ones((3, 3), np.uint8))
