"""Experiment configuration: dataclasses, one flat YAML per experiment, dotted overrides.

A config file has the four sections ``data``, ``model``, ``train`` and ``eval`` (plus an
optional ``name``). Every key must be a field of the matching dataclass: an unknown key is
an error naming it, so a typo never silently falls back to a default.

Example::

    cfg = load_config("configs/ssdd_maskrcnn_r50.yaml", ["train.lr=0.01", "model.num_classes=1"])
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


# Known names. The lists they mirror live in upper layers (evaluation.coco.PRESETS and IOU_TYPES,
# models.backbones.resnet_fpn.NORMS, engine.optim); tests/test_config.py keeps them in step.
PRESETS = ("coco", "isaid")
IOU_TYPES = ("bbox", "segm")
NORMS = ("frozen_bn", "bn", "gn")
PRETRAINED = ("none", "imagenet")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "step", "plateau", "constant")
TASKS = ("instance", "semantic", "prompted")  # mirrors rsiseg.tasks.TASKS
SAM_MODES = ("supervised", "self_training", "pointsam")
POINT_RULES = ("center", "random")
LABEL_FORMATS = ("index", "potsdam_rgb")
POINT_SAMPLINGS = ("uniform", "stratified")


@dataclass
class PointsConfig:
    """Sparse point labels of the semantic task: drawn once per image from dense labels, or read from a file.

    ``count`` wins over ``fraction`` when both are set. The draw is a function of ``seed`` and the
    image, so every epoch (and every resumed run) sees the same points.
    """

    count: int | None = None  # labelled points per image
    fraction: float | None = 0.2222  # share of pixels labelled: the report's 20,000 points of 300 x 300
    sampling: str = "uniform"  # uniform | stratified (the same number per class present, as far as it has pixels)
    seed: int = 0
    file: str | None = None  # real point labels (GeoJSON or CSV: image, x, y, class) instead of drawn ones


@dataclass
class DataConfig:
    """Where the COCO data lives and how it is augmented."""

    train_ann: str | None = None  # COCO instances JSON of the training split
    train_images: str | None = None  # folder the train file_names are relative to
    val_ann: str | None = None
    val_images: str | None = None
    repair: bool = False  # skip (and count) bad annotations instead of stopping with an error
    num_workers: int | None = None  # loader processes; null = the CPU cores available (at most 8)
    hflip: float = 0.5  # probabilities of each augmentation
    vflip: float = 0.5
    rot90: float = 0.5
    color_jitter: float = 0.0  # strength of brightness/contrast(/saturation/hue) jitter; 0 = off
    jitter_saturation_hue: bool = True  # RGB: jitter saturation and hue too (false: brightness/contrast only)
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])  # random rescale, ratio kept
    max_size: int | None = None  # resize (ratio kept) so the longest side is at most this
    # Training-set filters (the iSAID report's): both drop images, counted in the log; null = off.
    max_instances: int | None = None  # leave out training images holding more instances than this
    max_empty_fraction: float | None = None  # keep this share of the images without instances (iSAID: 0.3)
    # The semantic task: dense label maps paired with the images by name (see rsiseg.data.semantic).
    train_labels: str | None = None  # folder of label maps for train_images
    val_labels: str | None = None  # dense labels of the validation images (metrics are dense)
    label_format: str = "index"  # index (uint8 class indices, 255 = ignore) | potsdam_rgb (the ISPRS palette)
    image_size: int | None = None  # semantic: resize images and labels to this square side (the report: 150)
    points: PointsConfig = field(default_factory=PointsConfig)
    # prompted task: the one point prompt of each instance, derived from its mask: center (the interior pixel
    # farthest from the border) | random (a seeded interior pixel)
    instance_points: str = "center"
    # prompted task, point-only training (self_training / pointsam modes): a points JSON, CSV or GeoJSON of the
    # train_images instead of train_ann; its images need no masks (see rsiseg.data.point_labels)
    train_points: str | None = None


@dataclass
class SegConfig:
    """``model.seg``: the point-supervised semantic segmentation family (``seg_resnet18``)."""

    skip_connections: bool = False  # U-Net skips from the encoder; the report's plain decoder is the default
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])  # one per x2 upsampling
    focal_gamma: float = 2.0  # focal term of the partial cross-entropy; 0 = plain cross-entropy
    class_weights: str | None = None  # JSON written by `rsiseg data class-weights`; null = unweighted
    ignore_index: int = 255  # label value of unlabelled pixels


@dataclass
class AttentionConfig:
    """``model.attention``: the attention Mask R-CNN family (``maskrcnn_effb0_cbam``, the iSAID report's model)."""

    cbam_reduction: int = 16  # CBAM channel-MLP reduction
    cbam_kernel: int = 7  # CBAM spatial-attention kernel
    box_head_dim: int = 1024  # width of the two FC layers of the box head
    box_dropout: float = 0.3  # dropout between the FC layers and before the predictors
    mask_convs: int = 4  # 3x3 conv-BN-ReLU layers of the residual mask head
    backbone_drop_path: float = 0.0  # timm drop_path_rate of the EfficientNet blocks
    c5_head_conv: bool = True  # C5 = the 1280-channel head conv (the report's 24.3 M); false: the 320-channel stage


@dataclass
class CascadeConfig:
    """``model.cascade``: the Cascade Mask R-CNN box stages (``cascade_maskrcnn_*``)."""

    stage_ious: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7])  # foreground IoU of each stage
    stage_box_weights: list[list[float]] = field(  # box-coder weights (wx, wy, ww, wh) of each stage
        default_factory=lambda: [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0], [30.0, 30.0, 15.0, 15.0]])
    stage_loss_weights: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])


@dataclass
class PromptConfig:
    """``model.prompt``: the Insight Any Instance prompt paradigm (``*_prompt`` models); every part is a switch.

    With ``lpm`` and ``gpm`` off, ``parea_weight`` 0 and ``gt_prompt_ratio`` 0 the model is its baseline.
    """

    lpm: bool = True  # local prompt module: image crop per box, patch tokens + learnable-FFT tokens, MLP mixing
    gpm: bool = True  # global-to-local prompt module: box tokens cross-attend to whole-image tokens
    # Weight of the proposals' area loss (loss_parea); 0 = off. At 1.0 its gradient on the RPN's box layer was
    # 130x that of the RPN box loss (bench/bench_loss_gradients.py on an SSDD run, BENCHMARKS.md) and the
    # detector collapsed; 0.01 brings the two to the same size.
    parea_weight: float = 0.01
    parea_iou_floor: float = 0.5  # proposals count in loss_parea when their best IoU with a ground-truth box is above this
    crop_size: int = 28  # S_ps: side of each box's crop of the input image
    dim: int = 64  # token width of both modules
    patch_kernel: int = 7  # overlapping patch partition: kernel > stride
    patch_stride: int = 4
    global_size: int = 224  # GPM: side of the downsized whole image
    global_patch: int = 16  # GPM: patch side of the global tokens (no overlap)
    heads: int = 4  # GPM attention heads
    blocks: int = 2  # GPM cross-attention blocks
    fuse: str = "mask"  # mask | mask_box: the RoI features the prompts are added to
    fusion: str = "add"  # add (a learned projection added) | gated (the projection times a learned tanh gate, 0 at start)
    gt_prompt_ratio: float = 0.25  # share of ground-truth boxes mixed, jittered, into the mask branch's RoIs in training
    gt_prompt_jitter: float = 0.05  # box jitter, a fraction of the box side


@dataclass
class PhaseConfig:
    """``model.yolact.phase``: RELACT's phase enhancement of FPN levels (:mod:`rsiseg.models.layers.fourier`)."""

    enabled: bool = False
    levels: list[int] = field(default_factory=lambda: [3, 4, 5])  # FPN levels (P3-P7) that are enhanced
    amplitude: str = "mean"  # mean (every frequency gets the channel's mean amplitude) | unit (phase only, |F| = 1)
    kernel: int = 1  # side of the projection convolution of the phase-only map (1 or 3)
    gate: str = "channel"  # channel | scalar: the learnable gate of the residual, 0 at start


@dataclass
class YolactConfig:
    """``model.yolact``: YOLACT and RELACT (``yolact_*`` models); RELACT = ``phase.enabled`` + ``sorting: quality``."""

    num_prototypes: int = 32  # k
    head_channels: int = 256  # width of the shared prediction head's first conv
    pos_iou: float = 0.5  # anchor matching: positive at IoU >= this...
    neg_iou: float = 0.4  # ...negative below this; in between ignored
    negpos_ratio: int = 3  # online hard-negative mining: negatives per positive
    mask_size: int = 56  # M: the assembled masks are sampled M x M inside each box (loss and roi_masks)
    masks_per_image: int = 100  # positives per image whose masks are trained (a random draw above it)
    conf_weight: float = 1.0
    box_weight: float = 1.5
    mask_weight: float = 6.125
    semantic_weight: float = 1.0  # auxiliary semantic loss on P3; 0 = off
    quality_weight: float = 1.0  # mask-quality head's loss (only with sorting: quality)
    sorting: str = "confidence"  # confidence (YOLACT) | quality (RELACT: confidence x predicted mask IoU)
    pre_nms_top_k: int = 1000  # per class, candidates kept for Fast NMS
    phase: PhaseConfig = field(default_factory=PhaseConfig)


@dataclass
class SamConfig:
    """``model.sam``: PointSAM, SAM fine-tuned from point prompts (see :mod:`rsiseg.models.sam`).

    The variant is the model's name: ``pointsam_tiny`` (256 px input), ``pointsam_vit_b``/``_vit_l``/``_vit_h`` (1024).
    """

    checkpoint: str | None = None  # the official SAM weights (sam_vit_b_01ec64.pth, ...); null = random init
    mode: str = "pointsam"  # supervised (masks) | self_training (EMA teacher) | pointsam (+ prototypes, calibration)
    # decoder (the mask decoder alone) | lora (it plus LoRA adapters on the encoder's attention) | all (every
    # weight, the prompt encoder's too: to pretrain the tiny SAM, which has no released weights)
    trainable: str = "decoder"
    lora_rank: int = 4
    prompts_per_image: int = 32  # at most this many instances (prompts) per image and step, a random draw above it
    multimask: bool = True  # 3 candidate masks per prompt: the lowest loss trains, the highest predicted IoU answers
    box_prompts: float = 0.0  # supervised mode: share of instances prompted by their box instead (SAM's training mix)
    focal_weight: float = 20.0  # SAM's 20:1 focal to dice
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    ema_momentum: float = 0.999  # teacher = momentum x teacher + (1 - momentum) x student, every step
    confidence: float = 0.5  # pseudo-masks whose teacher-predicted IoU is below this do not supervise
    strong_jitter: float = 0.4  # the student's strong view: brightness/contrast jitter strength...
    strong_noise: float = 0.05  # ...Gaussian noise std (image in [0, 1])...
    strong_blur: float = 0.5  # ...and the probability of a 3x3 blur
    calibration: bool = True  # pointsam: negative prompts from overlapping pseudo-masks, masks made exclusive
    prototype_weight: float = 0.1  # pointsam: weight of the Hungarian prototype loss; 0 = off
    num_prototypes: int = 8  # k of the target prototypes' clustering
    prototype_bank: int = 512  # pseudo-mask prototypes kept for clustering
    prototype_interval: int = 20  # steps between reclusterings of the bank
    # trainable decoder only: a folder of the frozen encoder's embeddings, found again by image content (the
    # teacher's views, the plain images of supervised training and evaluation); null = encode every time
    embedding_cache: str | None = None


@dataclass
class ModelConfig:
    """Model architecture; ``name`` picks a builder from ``rsiseg.models.registry.MODELS``."""

    name: str = "maskrcnn_r50_fpn"
    num_classes: int = 1  # object classes, background excluded
    in_channels: int = 3
    pretrained: str = "none"  # imagenet | none
    backbone_checkpoint: str | None = None  # local backbone weights (torchvision key names)
    trainable_layers: int = 5  # backbone stages that train (0-5); 3 is usual with pretrained weights
    norm: str = "bn"  # frozen_bn | bn | gn, the backbone normalisation
    fpn_channels: int = 256
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # per band, [0, 1] scale
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    min_size: int = 800  # the model resizes the short side to this (ratio kept)...
    max_size: int = 1333  # ...unless the long side would exceed this
    anchor_sizes: list[list[int]] = field(default_factory=lambda: [[32], [64], [128], [256], [512]])
    anchor_ratios: list[list[float]] = field(default_factory=lambda: [[0.5, 1.0, 2.0]])  # one list or one per level
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    roi_fg_iou: float = 0.5
    roi_bg_iou: float = 0.5
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.25
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100  # up to 1000 for dense scenes
    seg: SegConfig = field(default_factory=SegConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    yolact: YolactConfig = field(default_factory=YolactConfig)
    sam: SamConfig = field(default_factory=SamConfig)


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and logging."""

    output_dir: str = "runs/exp"
    epochs: int = 12
    max_iters: int | None = None  # stop after this many iterations (overrides epochs when reached first)
    batch_size: int = 2
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    norm_weight_decay: float = 0.0  # weight decay of norm layers and biases
    backbone_lr_mult: float = 1.0
    roi_heads_lr_mult: float = 1.0
    scheduler: str = "cosine"  # cosine | step | plateau | constant
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    min_lr_factor: float = 0.0  # cosine floor, as a fraction of lr
    step_epochs: list[int] = field(default_factory=lambda: [8, 11])
    step_gamma: float = 0.1
    plateau_metric: str = "segm/AP"
    plateau_mode: str = "max"
    plateau_factor: float = 0.1
    plateau_patience: int = 2
    plateau_min_lr: float = 0.0  # ReduceLROnPlateau's floor
    amp: bool = True  # mixed precision, used on CUDA only
    grad_clip: float | None = None  # max gradient norm
    eval_interval: int = 1  # epochs between evaluations (0 = only at the end)
    checkpoint_interval: int = 0  # iterations between mid-epoch checkpoints (0 = at epoch ends only)
    best_metric: str = "segm/AP"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_interval: int = 20  # iterations between log lines (losses, lr, s/iter, ETA)
    tensorboard: bool = True
    wandb: bool = False  # also log the scalars to Weights & Biases (pip extra `wandb`; WANDB_MODE=offline honoured)
    wandb_project: str = "rsiseg"
    time_budget: float | None = None  # minutes of training per invocation, then checkpoint + final eval; null = off
    freeze_backbone_epochs: int = 0  # two-stage training: the backbone body stays frozen for these first epochs
    # Distributed runs (torchrun; see rsiseg.engine.distributed). batch_size is per process; the global batch is
    # batch_size x processes, and with lr_scaling linear the lr is multiplied by the number of processes.
    lr_scaling: str = "linear"  # linear | none
    sync_bn: bool = False  # convert the batch norms to SyncBatchNorm in a distributed run (model.norm bn)
    dist_timeout: float = 1800.0  # seconds a collective waits for the other processes before the run fails


@dataclass
class EvalConfig:
    """COCO evaluation settings."""

    preset: str = "coco"  # coco (maxDets 1/10/100, areas 32^2/96^2) | isaid (1/10/1000, 144^2/512^2)
    max_dets: list[int] | None = None  # overrides the preset's three maxDets
    iou_types: list[str] = field(default_factory=lambda: ["bbox", "segm"])
    score_threshold: float = 0.0
    mask_threshold: float = 0.5
    batch_size: int = 2


@dataclass
class ExperimentConfig:
    """One experiment: the four sections and a name."""

    name: str = "experiment"
    task: str = "instance"  # instance | semantic | prompted: what the data, the metrics and the outputs look like
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from nested dicts, rejecting unknown keys and bad values."""
    return validate_config(_parse(raw, source), source)


def _parse(raw: dict[str, Any], source: str) -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    return _build(ExperimentConfig, raw, source, prefix="")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML file (or start from defaults when ``path`` is None) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    source = str(path) if path else "defaults"
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
    cfg = _parse(raw, source)  # validated once the overrides are in: one may mend a file's value
    if not overrides:
        return validate_config(cfg, source)
    return apply_overrides(cfg, overrides, source=f"{source} with overrides")


def apply_overrides(cfg: ExperimentConfig, overrides: list[str], source: str = "overrides") -> ExperimentConfig:
    """Apply ``section.key=value`` strings; values are parsed as YAML (``[1, 2]``, ``null``, ``1e-3``)."""
    raw = to_dict(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        parts = key.strip().split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key {'.'.join(parts[: depth + 1])!r} in override {item!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {key.strip()!r} in override {item!r}")
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return config_from_dict(raw, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
    from rsiseg.fileio import atomic_write

    atomic_write(path, lambda handle: handle.write(yaml.safe_dump(to_dict(cfg), sort_keys=False)))


# A check returns None for a good value, else what the value must be.
Check = Callable[[Any], str | None]


def _rule(test: Callable[[Any], bool], requirement: str) -> Check:
    return lambda value: None if test(value) else requirement


def _optional(check: Check, meaning: str) -> Check:
    def checked(value: Any) -> str | None:
        problem = None if value is None else check(value)
        return None if problem is None else f"{problem}, or null ({meaning})"

    return checked


def _one_of(names: tuple[str, ...]) -> Check:
    return _rule(lambda value: value in names, f"must be one of {', '.join(names)}")


_POSITIVE = _rule(lambda v: v > 0, "must be > 0")
_NON_NEGATIVE = _rule(lambda v: v >= 0, "must be >= 0")
_FRACTION = _rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")
_POSITIVE_LISTS = _rule(lambda v: len(v) > 0 and all(len(x) > 0 and all(y > 0 for y in x) for x in v),
                        "must be a non-empty list of non-empty lists of positive numbers")

RULES: dict[str, Check] = {
    "task": _one_of(TASKS),
    "data.label_format": _one_of(LABEL_FORMATS),
    "data.image_size": _optional(_POSITIVE, "no resize"),
    "data.points.count": _optional(_POSITIVE, "use data.points.fraction"),
    "data.points.fraction": _optional(_rule(lambda v: 0 < v <= 1, "must be in (0, 1]"), "use data.points.count"),
    "data.points.sampling": _one_of(POINT_SAMPLINGS),
    "model.seg.decoder_channels": _rule(lambda v: len(v) == 5 and all(c > 0 for c in v),
                                        "must be five positive channel counts (one per x2 upsampling)"),
    "model.seg.focal_gamma": _NON_NEGATIVE,
    "model.seg.ignore_index": _rule(lambda v: 0 <= v <= 255, "must be in 0..255"),
    "data.num_workers": _optional(_NON_NEGATIVE, "auto"),
    **{f"data.{k}": _FRACTION for k in ("hflip", "vflip", "rot90")},
    "data.color_jitter": _NON_NEGATIVE,
    "data.scale_range": _rule(lambda v: len(v) == 2 and 0 < v[0] <= v[1],
                              "must be two positive numbers [low, high] with low <= high"),
    "data.max_size": _optional(_POSITIVE, "no resize"),
    "data.max_instances": _optional(_POSITIVE, "no limit"),
    "data.max_empty_fraction": _optional(_FRACTION, "keep every empty image"),
    **{f"model.attention.{k}": _POSITIVE for k in ("cbam_reduction", "box_head_dim", "mask_convs")},
    "model.attention.cbam_kernel": _rule(lambda v: v > 0 and v % 2 == 1, "must be a positive odd number"),
    "model.attention.box_dropout": _rule(lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "model.attention.backbone_drop_path": _rule(lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "model.cascade.stage_ious": _rule(lambda v: len(v) > 0 and all(0 < x < 1 for x in v), "must be IoUs in (0, 1)"),
    "model.cascade.stage_box_weights": _rule(lambda v: all(len(w) == 4 and min(w) > 0 for w in v),
                                             "must be one [wx, wy, ww, wh] of positive numbers per stage"),
    "model.cascade.stage_loss_weights": _rule(lambda v: all(x >= 0 for x in v), "must be >= 0"),
    **{f"model.prompt.{k}": _POSITIVE for k in ("crop_size", "dim", "patch_kernel", "patch_stride", "global_size",
                                                "global_patch", "heads", "blocks")},
    "model.prompt.parea_weight": _NON_NEGATIVE,
    "model.prompt.parea_iou_floor": _rule(lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "model.prompt.fuse": _one_of(("mask", "mask_box")),
    "model.prompt.fusion": _one_of(("add", "gated")),
    "model.prompt.gt_prompt_ratio": _FRACTION,
    "model.prompt.gt_prompt_jitter": _rule(lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
    **{f"model.yolact.{k}": _POSITIVE for k in ("num_prototypes", "head_channels", "negpos_ratio", "mask_size",
                                                "masks_per_image", "pre_nms_top_k")},
    **{f"model.yolact.{k}": _NON_NEGATIVE for k in ("conf_weight", "box_weight", "mask_weight", "semantic_weight",
                                                    "quality_weight")},
    **{f"model.yolact.{k}": _FRACTION for k in ("pos_iou", "neg_iou")},
    "model.yolact.sorting": _one_of(("confidence", "quality")),
    "model.yolact.phase.levels": _rule(lambda v: len(v) > 0 and len(set(v)) == len(v) and all(3 <= x <= 7 for x in v),
                                       "must be distinct FPN levels from 3..7"),
    "model.yolact.phase.amplitude": _one_of(("mean", "unit")),
    "model.yolact.phase.kernel": _rule(lambda v: v in (1, 3), "must be 1 or 3"),
    "model.yolact.phase.gate": _one_of(("channel", "scalar")),
    **{f"model.{k}": _POSITIVE for k in ("num_classes", "in_channels", "fpn_channels", "min_size", "max_size",
                                         "rpn_batch_size_per_image", "roi_batch_size_per_image",
                                         "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test",
                                         "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test")},
    "model.pretrained": _one_of(PRETRAINED),
    "model.norm": _one_of(NORMS),
    "model.trainable_layers": _rule(lambda v: 0 <= v <= 5, "must be in 0..5"),
    "model.image_std": _rule(lambda v: all(x > 0 for x in v), "must hold positive numbers"),
    "model.anchor_sizes": _POSITIVE_LISTS,
    "model.anchor_ratios": _POSITIVE_LISTS,
    **{f"model.{k}": _FRACTION for k in ("rpn_fg_iou", "rpn_bg_iou", "rpn_positive_fraction", "rpn_nms_thresh",
                                         "roi_fg_iou", "roi_bg_iou", "roi_positive_fraction",
                                         "box_score_thresh", "box_nms_thresh")},
    "model.detections_per_img": _rule(lambda v: 1 <= v <= 1000, "must be in 1..1000"),
    "train.output_dir": _rule(lambda v: bool(v.strip()), "must name a folder"),
    "train.epochs": _POSITIVE,
    "train.max_iters": _optional(_POSITIVE, "epochs decide"),
    "train.batch_size": _POSITIVE,
    "train.optimizer": _one_of(OPTIMIZERS),
    "train.lr": _POSITIVE,
    "train.momentum": _FRACTION,
    **{f"train.{k}": _NON_NEGATIVE for k in ("weight_decay", "norm_weight_decay", "backbone_lr_mult",
                                             "roi_heads_lr_mult", "warmup_iters", "plateau_patience",
                                             "eval_interval", "checkpoint_interval")},
    "train.scheduler": _one_of(SCHEDULERS),
    "train.warmup_factor": _FRACTION,
    "train.min_lr_factor": _FRACTION,
    "train.step_epochs": _rule(lambda v: all(e >= 0 for e in v), "must hold epochs >= 0"),
    "train.step_gamma": _POSITIVE,
    "train.plateau_mode": _one_of(("max", "min")),
    "train.plateau_factor": _rule(lambda v: 0 < v < 1, "must be in (0, 1)"),
    "train.plateau_min_lr": _NON_NEGATIVE,
    "train.wandb_project": _rule(lambda v: bool(v.strip()), "must name a project"),
    "train.grad_clip": _optional(_POSITIVE, "no clipping"),
    "train.device": _rule(lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None,
                          "must be auto, cpu, cuda, cuda:N or mps"),
    "train.log_interval": _POSITIVE,
    "train.time_budget": _optional(_POSITIVE, "off"),
    "train.freeze_backbone_epochs": _NON_NEGATIVE,
    "train.lr_scaling": _one_of(("linear", "none")),
    "train.dist_timeout": _POSITIVE,
    "model.sam.mode": _one_of(SAM_MODES),
    "model.sam.trainable": _one_of(("decoder", "lora", "all")),
    **{f"model.sam.{k}": _POSITIVE for k in ("lora_rank", "prompts_per_image", "num_prototypes", "prototype_bank",
                                             "prototype_interval")},
    **{f"model.sam.{k}": _NON_NEGATIVE for k in ("focal_weight", "dice_weight", "iou_weight", "strong_jitter",
                                                 "strong_noise", "prototype_weight")},
    **{f"model.sam.{k}": _FRACTION for k in ("ema_momentum", "confidence", "strong_blur", "box_prompts")},
    "data.instance_points": _one_of(POINT_RULES),
    "eval.preset": _one_of(PRESETS),
    "eval.max_dets": _optional(_rule(lambda v: len(v) == 3 and 0 < v[0] < v[1] < v[2],
                                     "must be three increasing positive ints"), "the preset's"),
    "eval.iou_types": _rule(lambda v: len(v) > 0 and len(set(v)) == len(v) and set(v) <= set(IOU_TYPES),
                            f"must be a non-empty list of distinct names from {', '.join(IOU_TYPES)}"),
    "eval.score_threshold": _FRACTION,
    "eval.mask_threshold": _FRACTION,
    "eval.batch_size": _POSITIVE,
}


def validate_config(cfg: ExperimentConfig, source: str = "config") -> ExperimentConfig:
    """Check every value against :data:`RULES` and the rules that tie two keys together.

    Returns:
        ``cfg`` itself, when every value is valid.

    Raises:
        ConfigError: naming each bad dotted key, its value and what it must be.
    """
    flat = dict(_leaves(to_dict(cfg)))
    # NaN passes no comparison and inf passes "> 0", so non-finite numbers are refused first, everywhere.
    non_finite = [key for key, value in flat.items()
                  if any(isinstance(x, float) and not math.isfinite(x) for x in _numbers(value))]
    problems = [f"{key!r} = {flat[key]!r} must be a finite number" for key in non_finite]
    for key, check in RULES.items():
        requirement = None if key in non_finite else check(flat[key])
        if requirement:
            problems.append(f"{key!r} = {flat[key]!r} {requirement}")
    model = cfg.model
    for stage in ("rpn", "roi"):
        low, high = getattr(model, f"{stage}_bg_iou"), getattr(model, f"{stage}_fg_iou")
        if low > high:
            problems.append(f"'model.{stage}_bg_iou' = {low!r} must be <= model.{stage}_fg_iou ({high!r})")
    if model.yolact.neg_iou > model.yolact.pos_iou:
        problems.append(f"'model.yolact.neg_iou' = {model.yolact.neg_iou!r} must be <= model.yolact.pos_iou "
                        f"({model.yolact.pos_iou!r})")
    for key in ("image_mean", "image_std"):
        if len(getattr(model, key)) != model.in_channels:
            problems.append(f"'model.{key}' has {len(getattr(model, key))} values but model.in_channels is "
                            f"{model.in_channels}: give one per band")
    problems += _train_points_problems(cfg)
    problems += _embedding_cache_problems(cfg)
    points = cfg.data.points
    if points.count is None and points.fraction is None and points.file is None:
        problems.append("'data.points' needs a count, a fraction or a file")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    return cfg


def _train_points_problems(cfg: ExperimentConfig) -> list[str]:
    """``data.train_points`` trains the prompted task's point-only modes, instead of ``data.train_ann``."""
    data = cfg.data
    if data.train_points is None:
        return []
    if cfg.task != "prompted":
        return [f"'data.train_points' trains the prompted task (point prompts); task is {cfg.task!r}"]
    problems = []
    if cfg.model.sam.mode == "supervised":
        problems.append("'data.train_points' gives points only, but 'model.sam.mode' = 'supervised' trains on "
                        "masks: use self_training or pointsam, or data.train_ann")
    if data.train_ann:
        problems.append("'data.train_points' and 'data.train_ann' are two training sets: set one")
    if data.max_instances is not None or data.max_empty_fraction is not None:
        problems.append("'data.max_instances' and 'data.max_empty_fraction' filter the images of data.train_ann; "
                        "set them to null with data.train_points")
    return problems


def _embedding_cache_problems(cfg: ExperimentConfig) -> list[str]:
    """``model.sam.embedding_cache`` needs a frozen encoder and training views that recur."""
    sam, data = cfg.model.sam, cfg.data
    if sam.embedding_cache is None:
        return []
    if sam.trainable != "decoder":
        return [f"'model.sam.embedding_cache' caches a frozen encoder, but 'model.sam.trainable' = {sam.trainable!r} "
                f"trains it (its embeddings change every step): use decoder"]
    if data.color_jitter > 0 or list(data.scale_range) != [1.0, 1.0]:
        return ["'model.sam.embedding_cache' stores views that recur, but data.color_jitter or data.scale_range "
                "make every training view new (the cache would only grow): turn them off or the cache"]
    return []


def _leaves(raw: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in raw.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _numbers(value: Any) -> Iterator[Any]:
    if isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    else:
        yield value


def _build(cls: type, raw: dict[str, Any], source: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        where = f"section {prefix.rstrip('.')!r}" if prefix else "the top level"
        raise ConfigError(
            f"{source}: unknown config key {prefix + unknown[0]!r} in {where}; valid keys: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix + name!r} must be a mapping")
            kwargs[name] = _build(hint, value, source, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}", source)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check a leaf value against its annotation; ints are accepted where floats are expected."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: {key!r} = {value!r} is not a valid {hint}")
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key!r} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # PyYAML reads "1e-3" as a string
        except ValueError:
            pass
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: {key!r} = {value!r} must be of type {getattr(hint, '__name__', hint)}")
