"""Readable overlays of instance predictions on any-band remote-sensing imagery.

``to_display_rgb`` (from :mod:`rsiseg.inference.display`) turns a 1-band (SAR), 3-band (RGB)
or N-band image into displayable RGB; ``draw_instances`` blends masks in class colours, outlines
them and their boxes, labels each instance with ``"name score"``, adds a legend (top-right) of
the classes present with their counts and, when the score threshold hid detections, a note
(bottom-left) saying how many, so that a blank overlay is never unexplained. Sizes of text and lines follow the image size, so a 128 px patch and a 4000 px
scene both read well. Masks come either as box-relative ``roi_masks``, pasted one box window
at a time (:mod:`rsiseg.inference.paste`) so that a dense scene never needs ``[N, H, W]``, or as
full-size ``masks``. Per-pixel work is vectorised (numpy/torch) within each instance's window;
instances, boxes and text loop in Python.
"""

from __future__ import annotations

import colorsys
import functools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from rsiseg.inference.display import to_display_rgb
from rsiseg.inference.paste import Window, iter_windows

__all__ = ["class_colors", "draw_instances", "save_overlay", "to_display_rgb"]

# Tags stop once they cover this fraction of the image: in dense scenes (hundreds of
# instances) the best-scoring ones keep their tags and the scene itself stays visible.
_TAG_AREA_BUDGET = 0.2
# The legend may cover at most this fraction of the image height (many classes on a small patch).
_LEGEND_MAX_HEIGHT = 0.5

# Sasha Trubetskoy's 20 distinct colours: bright enough to stand out on vegetation, water,
# desert and grey SAR backgrounds alike.
_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]  # fmt: skip


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct, deterministic RGB colours; entry ``i`` is the colour of label ``i + 1``.

    The first 20 come from a hand-picked palette; further ones step the hue by the golden
    ratio, which keeps consecutive labels far apart on the colour wheel.
    """
    colors = list(_PALETTE[:num_classes])
    for i in range(len(colors), num_classes):
        hue = (i * 0.618033988749895) % 1.0
        saturation, value = (0.85, 0.95) if i % 2 else (0.6, 0.8)
        r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors


def draw_instances(
    image_rgb: np.ndarray,
    pred: Mapping[str, torch.Tensor | np.ndarray],
    class_names: Sequence[str],
    score_threshold: float = 0.0,
    mask_threshold: float = 0.5,
    show_legend: bool = True,
    *,
    alpha: float = 0.45,
    note_hidden: bool = True,
) -> np.ndarray:
    """Draw instance predictions (or ground truth) over an image.

    Masks are alpha-blended in their class colour with a 1-px contour, boxes are outlined,
    and each instance gets a ``"name score"`` tag. Tags are placed best-score first and
    skipped when they would cover another tag or the legend, or when the box is smaller than
    about 12 px (or the font height on large images), so dense scenes stay readable. The
    legend sits in the top-right corner and lists the classes present with colour and count.
    When ``score_threshold`` hid detections, a note in the bottom-left corner, in the legend's
    font, says how many (``"12 below score 0.3"``), so that an empty overlay explains itself.

    Args:
        image_rgb: ``uint8[H, W, 3]``; any other image is first passed to :func:`to_display_rgb`.
        pred: ``boxes`` [N, 4] xyxy pixels, ``labels`` int [N] in 1..K, optional ``scores``
            [N] in [0, 1] (absent for ground truth: all drawn, no score in tags), and optionally
            masks: ``roi_masks`` float32 [N, M, M] (or [N, 1, M, M]) probabilities over each box,
            pasted as torchvision's ``paste_masks_in_image`` would (an ``image_size`` (H, W)
            field, if present, must match the image), or else full-size ``masks``
            [N, 1, H, W] or [N, H, W], probabilities or {0, 1}. Tensors or arrays.
        class_names: ``class_names[i]`` names label ``i + 1``.
        score_threshold: instances with a lower score are not drawn.
        mask_threshold: a mask pixel is foreground when strictly above it (>= 0 for
            ``roi_masks``: pixels outside a box are background).
        show_legend: draw the legend.
        alpha: opacity of the mask fill.
        note_hidden: write the note on detections hidden by ``score_threshold``.

    Returns:
        A new ``uint8[H, W, 3]`` image; the input is not modified.

    Raises:
        ValueError: fields of ``pred`` disagree in length, or masks (or ``image_size``) are not
            the image's size.
    """
    image = _as_display_image(image_rgb)
    height, width = image.shape[:2]
    boxes, labels, scores, order, hidden = _select_instances(pred, score_threshold)
    palette = class_colors(max([len(class_names), *labels.tolist()]))
    colors = np.array([palette[lab - 1] if lab >= 1 else (128, 128, 128) for lab in labels], np.uint8).reshape(-1, 3)

    out = image.copy()
    windows = _mask_windows(pred, order, height, width)
    if windows is not None and len(labels):
        _blend_masks(out, _instance_map(windows, height, width, mask_threshold), colors, alpha)

    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    style = _Style.for_size(height, width)
    for box, color in zip(boxes.tolist(), colors.tolist()):
        draw.rectangle(_clip_box(box, width, height), outline=tuple(color), width=style.line_width)

    occupied = np.zeros((height, width), dtype=bool)
    if show_legend and len(labels):
        _draw_legend(canvas, labels, class_names, palette, style, occupied)
    if note_hidden and hidden:
        _draw_note(canvas, f"{hidden} below score {score_threshold:.3g}", style, occupied)
    draw = ImageDraw.Draw(canvas)
    names = [_class_name(lab, class_names) for lab in labels.tolist()]
    tag_area, budget = 0, _TAG_AREA_BUDGET * height * width
    for i in reversed(range(len(labels))):  # best score first: those tags win the space
        if tag_area >= budget:
            break
        text = names[i] if scores is None else f"{names[i]} {scores[i]:.2f}"
        tag_area += _draw_tag(draw, boxes[i], text, tuple(colors[i].tolist()), style, occupied)
    return np.asarray(canvas, dtype=np.uint8).copy()


def save_overlay(
    path: str | os.PathLike,
    image_rgb: np.ndarray,
    pred: Mapping[str, torch.Tensor | np.ndarray],
    class_names: Sequence[str],
    **kwargs: Any,
) -> None:
    """Draw with :func:`draw_instances` (``kwargs`` go to it) and write a PNG, creating parent dirs."""
    overlay = draw_instances(image_rgb, pred, class_names, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay).save(path, format="PNG")


def _as_display_image(image: np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    return to_display_rgb(image)


# --------------------------------------------------------------------------- instances


def _select_instances(
    pred: Mapping[str, torch.Tensor | np.ndarray], score_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, int]:
    """Kept instances in drawing order (ascending score, so the best ends on top).

    Returns ``boxes float64[M, 4]``, ``labels int64[M]``, ``scores float64[M]`` or None (all
    kept, in drawing order), ``order int64[M]``: the original index of each kept instance, and
    the number of instances hidden by the threshold (``N - M``).
    Masks are only checked for length here; :func:`_mask_windows` reads them.
    """
    labels = _to_numpy(pred["labels"]).astype(np.int64).reshape(-1)
    n = len(labels)
    boxes = _to_numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4)
    scores = _to_numpy(pred["scores"]).astype(np.float64).reshape(-1) if pred.get("scores") is not None else None
    lengths = {"boxes": len(boxes), "labels": n}
    lengths.update({} if scores is None else {"scores": len(scores)})
    lengths.update({key: len(pred[key]) for key in ("masks", "roi_masks") if pred.get(key) is not None})
    if len(set(lengths.values())) > 1:
        raise ValueError(f"prediction fields disagree in length: {lengths}")

    if scores is None:
        order = np.arange(n)
    else:
        order = np.nonzero(scores >= score_threshold)[0]
        order = order[np.argsort(scores[order], kind="stable")]
    return boxes[order], labels[order], None if scores is None else scores[order], order, n - len(order)


def _to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _mask_windows(
    pred: Mapping[str, torch.Tensor | np.ndarray], order: np.ndarray, height: int, width: int
) -> Iterator[Window] | None:
    """Mask windows of the instances at ``order``, in that order; None when ``pred`` has no masks.

    ``roi_masks`` are pasted inside their boxes only (the main path); full-size ``masks`` become
    whole-image windows at ``(0, 0)``, views rather than copies.
    """
    index = torch.as_tensor(order, dtype=torch.int64)
    if pred.get("roi_masks") is not None:
        if pred.get("image_size") is not None:
            size = tuple(int(v) for v in _to_numpy(pred["image_size"]).reshape(-1))
            if size != (height, width):
                raise ValueError(f"prediction image_size is {size} but the image is {(height, width)}")
        rois = torch.as_tensor(pred["roi_masks"]).detach()
        boxes = torch.as_tensor(pred["boxes"]).detach().reshape(-1, 4)
        return iter_windows(rois[index.to(rois.device)], boxes[index.to(boxes.device)], (height, width))
    if pred.get("masks") is None:
        return None
    masks = torch.as_tensor(pred["masks"]).detach()
    masks = masks[:, 0] if masks.ndim == 4 else masks
    if tuple(masks.shape[-2:]) != (height, width):
        raise ValueError(f"masks are {tuple(masks.shape[-2:])} but the image is {(height, width)}")
    return ((masks[i], 0, 0) for i in order.tolist())


def _instance_map(windows: Iterable[Window], height: int, width: int, threshold: float) -> np.ndarray:
    """``int32[H, W]``: 1 + drawing position of the top instance covering each pixel, 0 for none.

    Args:
        windows: ``(local [h, w], x0, y0)`` per instance, in drawing order; any dtype and device.
        height, width: the image size.
        threshold: foreground when strictly above it.

    Windows come bottom-first, so each simply overwrites the instances below it; only one
    window is thresholded at a time.
    """
    top = np.zeros((height, width), dtype=np.int32)
    for rank, (local, x0, y0) in enumerate(windows, start=1):
        foreground = (local > threshold).cpu().numpy()
        h, w = foreground.shape
        np.copyto(top[y0 : y0 + h, x0 : x0 + w], rank, where=foreground)
    return top


def _blend_masks(out: np.ndarray, instance_map: np.ndarray, colors: np.ndarray, alpha: float) -> None:
    """In place: fill each instance in its colour at ``alpha`` and draw a 1-px opaque contour."""
    covered = instance_map > 0
    lut = np.concatenate([np.zeros((1, 3), np.float32), colors.astype(np.float32)])
    color = lut[instance_map[covered]]
    out[covered] = (out[covered].astype(np.float32) * (1.0 - alpha) + color * alpha + 0.5).astype(np.uint8)

    # A contour pixel belongs to an instance and touches a 4-neighbour with another id
    # (background or a neighbouring instance), so touching objects stay separable.
    edge = np.zeros_like(covered)
    vertical = instance_map[1:, :] != instance_map[:-1, :]
    horizontal = instance_map[:, 1:] != instance_map[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge &= covered
    out[edge] = lut[instance_map[edge]].astype(np.uint8)


# --------------------------------------------------------------------------- text and legend


class _Style:
    """Font and line sizes for one image size; everything scales with the longer side."""

    def __init__(self, font_size: int, line_width: int) -> None:
        self.font_size = font_size
        self.line_width = line_width
        self.font = _font(font_size)
        self.pad = max(1, font_size // 6)
        self.min_tag_box = max(12, font_size)  # boxes smaller than this get no tag

    @classmethod
    def for_size(cls, height: int, width: int) -> _Style:
        side = max(height, width)
        # ~1/64 of the side keeps tags at a similar fraction of the view at any zoom;
        # 9 px is the smallest size that is still legible on a 128 px patch.
        return cls(font_size=int(np.clip(round(side / 64), 9, 48)), line_width=max(1, round(side / 600)))


# DejaVu Sans Condensed is compact and well hinted at 8-10 px, where small patches need it;
# Pillow's built-in scalable font is the fallback on machines without DejaVu.
_FONT_FILES = ("DejaVuSansCondensed.ttf", "DejaVuSans.ttf")


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for name in _FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except (OSError, ImportError):
            continue
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _class_name(label: int, class_names: Sequence[str]) -> str:
    return class_names[label - 1] if 1 <= label <= len(class_names) else f"label {label}"


def _text_color(background: tuple[int, ...]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b = background[:3]
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _clip_box(box: list[float], width: int, height: int) -> list[float]:
    x1, y1, x2, y2 = box
    x1, x2 = sorted((min(max(x1, 0), width - 1), min(max(x2, 0), width - 1)))
    y1, y2 = sorted((min(max(y1, 0), height - 1), min(max(y2, 0), height - 1)))
    return [x1, y1, x2, y2]


def _draw_tag(
    draw: ImageDraw.ImageDraw,
    box: np.ndarray,
    text: str,
    color: tuple[int, ...],
    style: _Style,
    occupied: np.ndarray,
) -> int:
    """Draw a filled ``text`` tag above the box (inside it at the image top) unless it would collide.

    Returns:
        The tag's area in pixels, 0 when it was skipped (small box or no free space).
    """
    x1, y1, x2, y2 = box.tolist()
    if np.sqrt(max(x2 - x1, 0.0) * max(y2 - y1, 0.0)) < style.min_tag_box:
        return 0
    height, width = occupied.shape
    left, top, right, bottom = draw.textbbox((0, 0), text, font=style.font, anchor="lt")
    tag_w, tag_h = right - left + 2 * style.pad, bottom - top + 2 * style.pad
    x = int(min(max(x1, 0), max(width - tag_w, 0)))
    y = int(y1 - tag_h if y1 - tag_h >= 0 else max(y1, 0))
    region = occupied[y : y + tag_h, x : x + tag_w]
    if region.size == 0 or region.any():
        return 0
    region[...] = True
    draw.rectangle([x, y, x + tag_w - 1, y + tag_h - 1], fill=color)
    draw.text((x + style.pad, y + style.pad), text, font=style.font, fill=_text_color(color), anchor="lt")
    return region.size


def _draw_legend(
    canvas: Image.Image,
    labels: np.ndarray,
    class_names: Sequence[str],
    palette: list[tuple[int, int, int]],
    style: _Style,
    occupied: np.ndarray,
) -> None:
    """Top-right legend of the classes present: swatch, name and count, on a dimmed panel.

    The panel takes at most ``_LEGEND_MAX_HEIGHT`` of the image height; when the classes do
    not fit, the most frequent are listed (in label order) and the rest folded into "+k more".
    """
    present, counts = np.unique(labels, return_counts=True)
    rows = [(_class_name(int(lab), class_names), int(c), palette[lab - 1] if lab >= 1 else (128, 128, 128))
            for lab, c in zip(present, counts)]  # fmt: skip
    draw = ImageDraw.Draw(canvas)
    font, pad = style.font, style.pad
    _, top, _, bottom = draw.textbbox((0, 0), "Ag", font=font, anchor="lt")
    line_h = bottom - top + 2 * pad
    swatch = bottom - top
    margin = 2 * pad
    max_rows = max(2, int(_LEGEND_MAX_HEIGHT * canvas.height - 2 * pad) // line_h)
    if len(rows) > max_rows:
        by_count = sorted(range(len(rows)), key=lambda i: -rows[i][1])  # stable: ties keep label order
        shown = sorted(by_count[: max_rows - 1])
        rest = [rows[i] for i in by_count[max_rows - 1 :]]
        rows = [rows[i] for i in shown]
        texts = [f"{name} ({count})" for name, count, _ in rows] + [f"+{len(rest)} more ({sum(r[1] for r in rest)})"]
        colors = [color for _, _, color in rows] + [None]
    else:
        texts = [f"{name} ({count})" for name, count, _ in rows]
        colors = [color for _, _, color in rows]
    text_w = max(draw.textbbox((0, 0), t, font=font, anchor="lt")[2] for t in texts)
    panel_w = min(canvas.width, 4 * pad + swatch + text_w + 2 * pad)
    panel_h = min(canvas.height, len(texts) * line_h + 2 * pad)
    x0 = max(0, canvas.width - panel_w - margin)
    y0 = min(margin, max(0, canvas.height - panel_h))

    _dim_panel(canvas, x0, y0, panel_w, panel_h, occupied)
    draw = ImageDraw.Draw(canvas)
    for i, (text, color) in enumerate(zip(texts, colors)):
        y = y0 + pad + i * line_h
        text_x = x0 + 2 * pad
        if color is not None:
            draw.rectangle([x0 + 2 * pad, y + pad, x0 + 2 * pad + swatch - 1, y + pad + swatch - 1], fill=color,
                           outline=(255, 255, 255))  # fmt: skip
            text_x += swatch + 2 * pad
        draw.text((text_x, y + pad), text, font=font, fill=(255, 255, 255), anchor="lt")


def _draw_note(canvas: Image.Image, text: str, style: _Style, occupied: np.ndarray) -> None:
    """One line of white ``text`` on a dimmed panel in the bottom-left corner, in the legend's font."""
    draw = ImageDraw.Draw(canvas)
    pad = style.pad
    left, top, right, bottom = draw.textbbox((0, 0), text, font=style.font, anchor="lt")
    panel_w = min(canvas.width, right - left + 4 * pad)
    panel_h = min(canvas.height, bottom - top + 4 * pad)
    x0 = min(2 * pad, max(0, canvas.width - panel_w))
    y0 = max(0, canvas.height - panel_h - 2 * pad)
    _dim_panel(canvas, x0, y0, panel_w, panel_h, occupied)
    ImageDraw.Draw(canvas).text((x0 + 2 * pad, y0 + 2 * pad), text, font=style.font, fill=(255, 255, 255), anchor="lt")


def _dim_panel(canvas: Image.Image, x0: int, y0: int, width: int, height: int, occupied: np.ndarray) -> None:
    """Darken a panel (vectorised) rather than paint it opaque, so the scene stays visible; mark it occupied."""
    pixels = np.asarray(canvas).copy()
    pixels[y0 : y0 + height, x0 : x0 + width] = (pixels[y0 : y0 + height, x0 : x0 + width] * 0.3).astype(np.uint8)
    canvas.paste(Image.fromarray(pixels))
    occupied[y0 : y0 + height, x0 : x0 + width] = True
