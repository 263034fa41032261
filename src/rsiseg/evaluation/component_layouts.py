"""Which modules make up each component row of :func:`rsiseg.evaluation.efficiency.parameter_breakdown`.

A model family with a fixed anatomy is described by a :class:`Layout` in :data:`LAYOUTS`: row names and
the attribute paths of the modules each row covers. A path segment ``*`` matches any child, so
``roi_heads.stages.*.box_head`` is the box head of every cascade stage, however many there are. Rows
of a layout are shown even when a model has none of their modules, so tables of variants line up
(an ablation with the LPM off shows ``prompt: LPM`` at zero).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from rsiseg.models.prompt.model import PromptRCNN

CBAM_ROW = "cbam"


class Layout(NamedTuple):
    """How one model family splits into components.

    Attributes:
        requires: attribute paths (no ``*``) the model must have for this layout to apply.
        components: ``(row name, attribute paths)`` in display order; paths that a model lacks are
            skipped. :data:`CBAM_ROW` (no paths) marks where the CBAM row goes. Paths must not nest.
        model_types: when given, the model must also be an instance of one of these.
    """

    requires: tuple[str, ...]
    components: tuple[tuple[str, tuple[str, ...]], ...]
    model_types: tuple[type[nn.Module], ...] = ()


RCNN_REQUIRES = ("backbone", "rpn", "roi_heads")
# Mask R-CNN and its torchvision GeneralizedRCNN relatives; a cascade's stages share the box rows.
RCNN_COMPONENTS = (
    ("backbone", ("backbone.body",)),
    (CBAM_ROW, ()),
    ("fpn", ("backbone.fpn",)),
    ("rpn", ("rpn",)),
    ("box head", ("roi_heads.box_head", "roi_heads.stages.*.box_head")),
    ("box predictor", ("roi_heads.box_predictor", "roi_heads.stages.*.box_predictor")),
    ("mask head", ("roi_heads.mask_head", "roi_heads.mask_predictor")),
)
# The prompt paradigm's modules (roi_heads.prompter, a PromptFusion): one row per ablation switch.
PROMPT_COMPONENTS = (
    ("prompt: LPM", ("roi_heads.prompter.lpm",)),
    ("prompt: GPM", ("roi_heads.prompter.gpm",)),
    ("prompt: fusion", ("roi_heads.prompter.project", "roi_heads.prompter.gate")),
)

# YOLACT and RELACT: one row per part; RELACT's phase blocks and mask-quality branch get their own rows.
YOLACT_REQUIRES = ("backbone", "protonet", "head")
YOLACT_COMPONENTS = (
    ("backbone", ("backbone.body",)),
    ("fpn", ("backbone.fpn",)),
    ("phase enhancement", ("phase",)),
    ("protonet", ("protonet",)),
    ("prediction head", ("head.upfeature", "head.conf", "head.box", "head.coef")),
    ("mask quality", ("head.quality",)),
    ("semantic head", ("semantic_head",)),
)

# A new family with a fixed anatomy adds its layout here; the first that applies is used, and a model
# that none fits falls back to its top-level children.
LAYOUTS: tuple[Layout, ...] = (
    Layout(RCNN_REQUIRES, RCNN_COMPONENTS + PROMPT_COMPONENTS, model_types=(PromptRCNN,)),
    Layout(RCNN_REQUIRES, RCNN_COMPONENTS),
    Layout(YOLACT_REQUIRES, YOLACT_COMPONENTS),
)


def get_path(model: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted ``path``, or None when the model has none there."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def expand_path(model: nn.Module, pattern: str) -> list[str]:
    """The dotted paths of the submodules that ``pattern`` names (``*`` matches any one child), in module order."""
    found = [("", model)]
    for part in pattern.split("."):
        found = [(f"{prefix}.{name}" if prefix else name, child)
                 for prefix, module in found for name, child in module.named_children() if part in ("*", name)]
    return [path for path, _ in found]


def applies(layout: Layout, model: nn.Module) -> bool:
    """Whether ``model`` has every path ``layout`` requires (and is one of its types, when it names some)."""
    if layout.model_types and not isinstance(model, layout.model_types):
        return False
    return all(get_path(model, path) is not None for path in layout.requires)


def layout_rows(model: nn.Module) -> tuple[list[tuple[str, list[str]]], bool]:
    """``(row name, module paths present)`` per row, and whether a fixed layout applied.

    Without a fitting layout, one row per top-level child, then the CBAM row.
    """
    for layout in LAYOUTS:
        if applies(layout, model):
            return [(name, [p for pattern in paths for p in expand_path(model, pattern)])
                    for name, paths in layout.components], True
    return [(name, [name]) for name, _ in model.named_children()] + [(CBAM_ROW, [])], False
