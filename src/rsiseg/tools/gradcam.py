"""Grad-CAM for each detected instance of an R-CNN model: where the evidence for its class lies.

For one image, the model first detects as usual (eval mode). Each detection's score is then
recomputed from a chosen feature map ``A`` [1, C, h, w]: its box, scaled into the transformed
image, goes through the RoI heads' box branch (:func:`box_class_logits`: the box pooler, the
prompter where the model has one, the box head and predictor), and a differentiable class score of
its label is taken, called its logit below:

- single-stage heads (Mask R-CNN): the **pre-softmax class logit** (the softmax would couple it to
  the other classes' logits);
- cascade heads: the **mean over the stages of each stage's pre-softmax
  logit**, the stages run in sequence from the box as in eval (stage t scores the box regressed by
  stage t - 1; the regression is detached, so the gradient flows through the pooled features only).
  The detection's score is the mean of the stages' softmax probabilities instead; the mean logit is
  explained for the same reason as above, and with one stage it is the single-stage logit.

Prompt models (``roi_heads.prompter``): the box's prompts, from the prompter's encoding of the
transformed image as in the model's forward, are added to its pooled features, so the explanation
includes them; they are computed from the image, not from ``A``, so no gradient flows through them.

Grad-CAM (Selvaraju et al., 2017) then weighs each channel by the spatial mean of
``d logit / d A`` and keeps the positive part of the weighted sum::

    w_c = mean_{y,x} d logit / d A_c[y, x]        cam = ReLU(sum_c w_c A_c)

upsampled to the input image and divided by its maximum (an all-zero map stays zero).

The box is the detection's final (regressed) box, so the logit explained is close to, not equal
to, the logit of the proposal that produced the detection.

Layers (:func:`layer_names`):

- ``fpn:<level>``: one FPN output read by the RoI pooler (``fpn:0`` is P2, stride 4). torchvision's
  pooler reads one level per box, chosen by the box size, so a box pooled from another level gets
  a blank map there.
- ``fpn``: every level the pooler reads, each instance's maps summed: in effect the level its own
  box is pooled from. The default, since it never leaves an instance blank for that reason.
- ``backbone.<module path>``: the output of a backbone module, e.g. a stage of the body; its
  gradient reaches every FPN level. Any module that runs once and outputs ``[1, C, h, w]`` works;
  :func:`layer_names` lists the outermost such modules of the body (its stages), found by running
  the backbone once on a blank probe image, so no architecture's layer names are assumed.

Gradients stop at ``A``: parameters are frozen and ``A`` is a detached leaf, so one backward pass
per instance runs only through the layers after ``A`` (``torch.autograd.grad`` w.r.t. ``A``, the
graph retained), never through the backbone below it.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.transform import resize_boxes

from rsiseg.models.layers.box_prompting import prompt_context

AUTO_LEVEL = "fpn"
LEVEL_PREFIX = "fpn:"
MODULE_PREFIX = "backbone"
# Side of the blank image that :func:`layer_names` runs through the backbone: a multiple of the
# largest stride (64, the pooled P6), and small enough to cost little even for ResNet-101.
_PROBE_SIZE = 64
_ROI_PARTS = ("box_roi_pool", "box_head", "box_predictor")  # the box branch of heads without box_class_logits


def layer_names(model: nn.Module) -> list[str]:
    """The layers :func:`instance_cams` can explain: ``fpn``, ``fpn:<level>``, then the body's stages.

    The stages are the outermost modules under ``backbone.body`` (or ``backbone`` when it has no
    ``body``; FPN modules excluded) that run once, output a 4-D feature map and feed the levels
    the RoI heads pool, found by running the backbone (and one backward pass) in eval mode on a
    blank ``[1, C, 64, 64]`` image; the model's mode is restored and no weight gradient is kept.

    Raises:
        ValueError: the model has no RoI heads (e.g. a semantic segmentation model).
    """
    _check_detector(model)
    levels = _roi_levels(model)
    names = [AUTO_LEVEL, *(LEVEL_PREFIX + level for level in levels)] if levels else []
    return names + _backbone_stages(model)


def check_layer(model: nn.Module, layer: str) -> None:
    """Refuse a model without RoI heads, or a ``layer`` that is neither listed nor a backbone module.

    Raises:
        ValueError: naming the valid layers.
    """
    _check_detector(model)
    _parse_layer(model, layer)


def instance_cams(
    model: nn.Module,
    image: Tensor,
    layer: str = AUTO_LEVEL,
    *,
    score_threshold: float = 0.3,
    max_instances: int = 20,
    detections: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Detect instances in one image and compute each one's Grad-CAM map at ``layer``.

    Args:
        model: an R-CNN (``transform``, ``backbone``, ``roi_heads`` with ``box_roi_pool`` and a box
            branch :func:`box_class_logits` can score: Mask R-CNN, Cascade, the prompt models), e.g. from
            :func:`rsiseg.inference.predictor.load_model`.
            Run in eval mode with frozen parameters; its mode and ``requires_grad`` flags are restored.
        image: float ``[C, H, W]`` in [0, 1], on the model's device.
        layer: one of :func:`layer_names`, or any ``backbone.<module path>``.
        score_threshold: keep detections scoring at least this (softmax score in [0, 1]).
        max_instances: keep at most this many, best score first.
        detections: explain these instead of detecting: ``boxes`` float ``[N, 4]`` xyxy in
            image pixels, ``labels`` int64 ``[N]`` in 1..K, optional ``scores`` ``[N]`` (the
            threshold and limit do not apply).

    Returns:
        ``(detections, cams)``, on CPU. ``detections``: ``boxes`` float ``[N, 4]`` xyxy image
        pixels, ``labels`` int64 ``[N]``, ``scores`` float ``[N]`` in [0, 1], ``logits`` float
        ``[N]`` (the recomputed class score that was explained: see the module docstring) and ``peaks`` float
        ``[N]`` (each map's maximum before normalisation; 0 means a blank map: no activation of
        ``layer`` raises the logit). ``cams``: float32 ``[N, H, W]`` in [0, 1].

    Raises:
        ValueError: no RoI heads; an unknown layer (the valid names are listed); a module layer
            that runs more than once or outputs no ``[1, C, h, w]`` tensor.
    """
    _check_detector(model)
    target = _parse_layer(model, layer)
    height, width = image.shape[-2:]
    with _eval_mode(model), _frozen(model), torch.enable_grad(), _capture(model, target) as captured:
        if detections is None:
            detections = _best(model([image])[0], score_threshold, max_instances)
        else:
            detections = _given(detections, image.device)
            model.backbone(model.transform([image])[0].tensors)
        if captured.images is None or captured.features is None or not captured.activations:
            raise ValueError(f"layer {layer!r} did not run in the forward pass (a container whose children the "
                             f"parent calls itself?); valid layers: {', '.join(layer_names(model))}")
        logits = _class_logits(model, captured, detections, (height, width))
        cams, peaks = [], []
        for logit in logits:
            cam = _instance_cam(logit, captured, (height, width))
            peaks.append(cam.max())
            cams.append(cam / peaks[-1] if peaks[-1] > 0 else torch.zeros_like(cam))  # all-zero stays zero
    out = {**{k: v.detach().cpu() for k, v in detections.items()}, "logits": logits.detach().cpu(),
           "peaks": torch.stack(peaks).cpu() if peaks else torch.zeros(0)}
    stacked = torch.stack(cams).cpu() if cams else torch.zeros(0, height, width)
    return out, stacked.float().clamp_(0.0, 1.0)


def grad_cam(activation: Tensor, gradient: Tensor) -> Tensor:
    """The Grad-CAM map ``ReLU(sum_c w_c A_c)`` with ``w_c`` the spatial mean of the gradient.

    Args:
        activation: ``A``, float ``[1, C, h, w]`` or ``[C, h, w]``.
        gradient: ``d score / d A``, the same shape.

    Returns:
        float ``[h, w]``, >= 0, not normalised.
    """
    weights = gradient.mean(dim=(-2, -1), keepdim=True)
    return F.relu((weights * activation).sum(dim=-3)).reshape(activation.shape[-2:])


def box_class_logits(
    heads: nn.Module, features: Mapping[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]],
    context: Any = None,
) -> Tensor:
    """Differentiable class scores of given boxes: pre-softmax logits, a cascade's averaged over its stages.

    Args:
        heads: the model's ``roi_heads``: the package's RoI heads answer through their
            ``box_class_logits`` method (the prompter runs, a cascade averages its stages' logits);
            other heads need ``box_roi_pool``, ``box_head`` and ``box_predictor``.
        features: the FPN levels the box pooler reads, ``[B, C, h, w]`` each.
        boxes: per image ``[K_i, 4]`` xyxy in network-input pixels.
        image_shapes: per image (H, W) at network input.
        context: the prompter's encoding of the batch (:func:`~rsiseg.models.layers.box_prompting.prompt_context`),
            or None.

    Returns:
        ``[sum K_i, num_classes + 1]``, background first.
    """
    method = getattr(heads, "box_class_logits", None)
    if callable(method):  # the package's RoI heads (single-stage, cascade, with or without a prompter)
        return method(features, boxes, image_shapes, context)
    return heads.box_predictor(heads.box_head(heads.box_roi_pool(features, boxes, image_shapes)))[0]


def heatmap_overlay(image_rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.5, colormap: str = "turbo") -> np.ndarray:
    """Blend a heat map into an image.

    Args:
        image_rgb: ``uint8[H, W, 3]``.
        cam: float ``[H, W]`` in [0, 1] (clipped).
        alpha: opacity of the colour map, the same everywhere so the scene stays comparable.
        colormap: a matplotlib colour map name (``turbo``, ``jet``, ...).

    Returns:
        A new ``uint8[H, W, 3]``.
    """
    from matplotlib import colormaps  # matplotlib costs its import only where maps are drawn

    colors = colormaps[colormap](np.clip(np.asarray(cam, dtype=np.float32), 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * image_rgb.astype(np.float32) + alpha * colors
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class _Target:
    """A parsed layer: the FPN levels to explain, or one backbone module."""

    name: str
    levels: tuple[str, ...] = ()
    module: nn.Module | None = None


def _check_detector(model: nn.Module) -> None:
    heads = getattr(model, "roi_heads", None)
    missing = [n for n in ("transform", "backbone") if not hasattr(model, n)]
    # Heads that score boxes themselves need only the pooler of their own.
    parts = _ROI_PARTS[:1] if hasattr(heads, "box_class_logits") else _ROI_PARTS
    missing += [f"roi_heads.{n}" for n in parts if not hasattr(heads, n)]
    if missing:
        raise ValueError(f"{type(model).__name__} has no RoI heads (missing {', '.join(missing)}): Grad-CAM per "
                         "detected instance needs an R-CNN detector such as maskrcnn_r50_fpn, and this model has "
                         "no layers it can explain")


def _roi_levels(model: nn.Module) -> list[str]:
    """The feature levels the box pooler reads (torchvision's ``MultiScaleRoIAlign.featmap_names``)."""
    return [str(name) for name in getattr(model.roi_heads.box_roi_pool, "featmap_names", [])]


def _parse_layer(model: nn.Module, layer: str) -> _Target:
    levels = _roi_levels(model)
    if layer == AUTO_LEVEL and levels:
        return _Target(layer, levels=tuple(levels))
    if layer.startswith(LEVEL_PREFIX) and layer[len(LEVEL_PREFIX):] in levels:
        return _Target(layer, levels=(layer[len(LEVEL_PREFIX):],))
    if layer == MODULE_PREFIX or layer.startswith(MODULE_PREFIX + "."):
        with contextlib.suppress(AttributeError):
            return _Target(layer, module=model.get_submodule(layer))
    raise ValueError(f"unknown layer {layer!r}; valid layers: {', '.join(layer_names(model))} "
                     f"(or any {MODULE_PREFIX}.<module path> whose output is a feature map)")


def _backbone_stages(model: nn.Module) -> list[str]:
    """The outermost modules of the body that run once, output ``[1, C, h, w]`` and feed the pooled levels."""
    backbone = model.backbone
    has_body = isinstance(getattr(backbone, "body", None), nn.Module)
    root, prefix = (backbone.body, f"{MODULE_PREFIX}.body") if has_body else (backbone, MODULE_PREFIX)
    modules = [(n, m) for n, m in root.named_modules() if has_body or not (n == "fpn" or n.startswith("fpn."))]
    outputs: dict[str, list[Any]] = {}  # name -> its output at each call

    def record(name: str):
        return lambda _module, _inputs, out: outputs.setdefault(name, []).append(out)

    hooks = [m.register_forward_hook(record(n)) for n, m in modules]
    parameter = next(model.parameters(), None)
    # The probe needs grad so that every module's output joins the graph, even with frozen weights.
    probe = torch.zeros(1, len(model.transform.image_mean), _PROBE_SIZE, _PROBE_SIZE, requires_grad=True,
                        device=parameter.device if parameter is not None else None)
    try:
        with _eval_mode(model), torch.enable_grad():  # eval: the probe must not move BatchNorm statistics
            features = backbone(probe)
    finally:
        for hook in hooks:
            hook.remove()
    maps = {n: out[0] for n, out in outputs.items()
            if len(out) == 1 and isinstance(out[0], Tensor) and out[0].dim() == 4 and out[0].requires_grad}
    pooled = [features[level] for level in _roi_levels(model) if level in features] or list(features.values())
    # A module that runs but does not feed the pooled levels (e.g. a classifier head left in the
    # body) would only ever give blank maps: its gradient is None.
    grads = torch.autograd.grad(sum(level.sum() for level in pooled), list(maps.values()), allow_unused=True)
    used = {n for n, g in zip(maps, grads) if g is not None}
    kept: list[str] = []
    for name, _ in modules:  # parents come before their children
        if name in used and not any(k == "" or name.startswith(k + ".") for k in kept):
            kept.append(name)
    return [f"{prefix}.{name}" if name else prefix for name in kept if has_body or name]


# --------------------------------------------------------------------------- computation


@dataclass
class _Captured:
    """What the hooks saw: the transformed batch, the backbone's output and the leaves ``A``."""

    inputs: list[Tensor] = field(default_factory=list)  # the transform's input: [C, H, W] images as given
    images: Any = None  # torchvision ImageList: tensors [1, C, Hp, Wp], image_sizes [(h, w)]
    features: OrderedDict[str, Tensor] | None = None
    activations: list[Tensor] = field(default_factory=list)


@contextlib.contextmanager
def _capture(model: nn.Module, target: _Target) -> Iterator[_Captured]:
    """Hooks that record the batch and features, and make the chosen layer a leaf that needs grad."""
    captured = _Captured()

    def on_transform(_module: nn.Module, inputs: Any, output: Any) -> None:
        captured.inputs = list(inputs[0])
        captured.images = output[0]

    def on_backbone(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        features = OrderedDict(output)
        for level in target.levels:
            features[level] = features[level].detach().requires_grad_()
            captured.activations.append(features[level])
        captured.features = features
        return features

    def on_module(_module: nn.Module, _inputs: Any, output: Any) -> Tensor:
        if captured.activations:
            raise ValueError(f"layer {target.name!r} runs more than once per forward pass; choose a module that "
                             "runs once (e.g. a stage listed by --list-layers)")
        if not isinstance(output, Tensor) or output.dim() != 4:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"layer {target.name!r} outputs {shape}, not a [1, C, h, w] feature map")
        leaf = output.detach().requires_grad_()  # gradients stop here: nothing below A is differentiated
        captured.activations.append(leaf)
        return leaf.clone()  # the next module may work in place (ReLU after BN), which a leaf forbids

    hooks = [model.transform.register_forward_hook(on_transform), model.backbone.register_forward_hook(on_backbone)]
    if target.module is not None:
        hooks.append(target.module.register_forward_hook(on_module))
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


def _class_logits(model: nn.Module, captured: _Captured, detections: Mapping[str, Tensor],
                  size: tuple[int, int]) -> Tensor:
    """``[N]`` class logit of each detection's label (:func:`box_class_logits`), its box pooled from the
    captured features, with the prompts of the model's prompter (if any)."""
    labels = detections["labels"]
    if len(labels) == 0:
        return torch.zeros(0, device=labels.device)
    images = captured.images
    rois = resize_boxes(detections["boxes"], size, tuple(images.image_sizes[0]))  # into the transformed image
    context = prompt_context(model, captured.inputs, images)
    class_logits = box_class_logits(model.roi_heads, captured.features, [rois], images.image_sizes, context)
    return class_logits[torch.arange(len(labels), device=labels.device), labels]


def _instance_cam(logit: Tensor, captured: _Captured, size: tuple[int, int]) -> Tensor:
    """float ``[H, W]`` >= 0: the Grad-CAM of one logit, summed over the captured activations."""
    images = captured.images
    total = torch.zeros(size, device=logit.device)
    if not logit.requires_grad:  # the layer does not feed the box head at all (a side branch)
        return total
    grads = torch.autograd.grad(logit, captured.activations, retain_graph=True, allow_unused=True)
    for activation, grad in zip(captured.activations, grads):
        if grad is not None:  # None: this activation does not feed the score
            cam = grad_cam(activation.detach(), grad)
            total += _to_image(cam, tuple(images.tensors.shape[-2:]), tuple(images.image_sizes[0]), size)
    return total


def _to_image(cam: Tensor, padded: tuple[int, int], resized: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """A ``[h, w]`` map over the padded batch -> ``[H, W]`` over the input image (bilinear, so >= 0 stays)."""
    grid = cam[None, None]
    if tuple(grid.shape[-2:]) != padded:
        grid = F.interpolate(grid, size=padded, mode="bilinear", align_corners=False)
    grid = grid[..., : resized[0], : resized[1]]  # the padding is no part of the image
    if resized != size:
        grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    return grid[0, 0]


def _best(output: Mapping[str, Tensor], score_threshold: float, max_instances: int) -> dict[str, Tensor]:
    """The detections scoring at least ``score_threshold``, best first, at most ``max_instances``."""
    scores = output["scores"].detach()
    keep = torch.nonzero(scores >= score_threshold).flatten()
    keep = keep[torch.argsort(scores[keep], descending=True)][:max_instances]
    return {"boxes": output["boxes"].detach()[keep], "labels": output["labels"][keep], "scores": scores[keep]}


def _given(detections: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    boxes = torch.as_tensor(detections["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
    labels = torch.as_tensor(detections["labels"], dtype=torch.int64, device=device).reshape(-1)
    scores = detections.get("scores")
    scores = torch.ones(len(labels), device=device) if scores is None else torch.as_tensor(scores, device=device)
    return {"boxes": boxes, "labels": labels, "scores": scores.float().reshape(-1)}


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter needs grad, so only the graph from ``A`` on is built (no weight gradients)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
