"""SAM built from the official ``segment-anything`` classes: ViT-B/L/H as released, and a tiny one for CPU.

The official weights come from the segment-anything repository's "Model Checkpoints" links
(``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth``); download one and set
``model.sam.checkpoint`` to its path. The file is a plain state dict, read with ``weights_only=True``.

The tiny SAM is the same architecture (the real :class:`ImageEncoderViT`, :class:`PromptEncoder`,
:class:`MaskDecoder` and :class:`TwoWayTransformer`) at a 256-pixel input, 4 encoder blocks of width 96 and
a 64-wide prompt/decoder space: about 0.7 M parameters, for tests and the CPU demo. It has no
released weights; the supervised mode pretrains it on synthetic masks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from rsiseg.config import ModelConfig
from rsiseg.models.sam.model import PointSam

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamVariant:
    """The sizes of one SAM variant (the official builders' arguments)."""

    image_size: int
    patch_size: int
    embed_dim: int
    depth: int
    heads: int
    global_attn: tuple[int, ...]
    window: int
    prompt_dim: int  # width of the prompt encoder, the decoder and the image embedding
    decoder_mlp: int
    decoder_heads: int
    iou_hidden: int


VARIANTS: dict[str, SamVariant] = {
    "tiny": SamVariant(256, 8, 96, 4, 3, (1, 3), 8, 64, 256, 4, 64),
    "vit_b": SamVariant(1024, 16, 768, 12, 12, (2, 5, 8, 11), 14, 256, 2048, 8, 256),
    "vit_l": SamVariant(1024, 16, 1024, 24, 16, (5, 11, 17, 23), 14, 256, 2048, 8, 256),
    "vit_h": SamVariant(1024, 16, 1280, 32, 16, (7, 15, 23, 31), 14, 256, 2048, 8, 256),
}


def build_sam(variant: str, in_channels: int = 3, checkpoint: str | Path | None = None) -> Sam:
    """A SAM of ``variant``, with the official weights of ``checkpoint`` when given.

    Normalisation is not SAM's business here: :class:`~rsiseg.models.sam.model.PointSam` normalises
    with ``model.image_mean``/``image_std`` (whose defaults are SAM's own pixel mean and std / 255).

    Args:
        variant: a key of :data:`VARIANTS`.
        in_channels: image bands. With a 3-band checkpoint and another band count, the patch
            embedding's RGB filters are averaged and repeated (scaled by 3 / bands), so a SAR or
            multispectral image starts from the filters' grey-level response.
        checkpoint: path of an official (or compatible) SAM state dict.

    Raises:
        ValueError: unknown variant, or a checkpoint whose keys or shapes do not fit (naming the file
            and the first keys at fault).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown model.sam.variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    v = VARIANTS[variant]
    embedding = v.image_size // v.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=v.image_size, patch_size=v.patch_size, in_chans=in_channels, embed_dim=v.embed_dim,
            depth=v.depth, num_heads=v.heads, mlp_ratio=4, out_chans=v.prompt_dim, qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, global_attn_indexes=v.global_attn,
            window_size=v.window),
        prompt_encoder=PromptEncoder(embed_dim=v.prompt_dim, image_embedding_size=(embedding, embedding),
                                     input_image_size=(v.image_size, v.image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=v.prompt_dim, mlp_dim=v.decoder_mlp,
                                          num_heads=v.decoder_heads),
            transformer_dim=v.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=v.iou_hidden),
        pixel_mean=[0.0] * in_channels, pixel_std=[1.0] * in_channels)
    if checkpoint is not None:
        load_sam_weights(sam, checkpoint)
    return sam


def load_sam_weights(sam: Sam, checkpoint: str | Path) -> None:
    """Load an official SAM state dict into ``sam`` (before any LoRA wrapping changes the key names).

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing or unexpected keys, or shapes that differ, naming the file and the keys.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"model.sam.checkpoint {path}: no such file (the official SAM weights are linked "
                                "from the segment-anything repository's README, 'Model Checkpoints')")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated download, an HTML page saved as .pth, a pickle of other objects
        raise ValueError(f"model.sam.checkpoint {path}: cannot be read as a weights-only state dict ({err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"model.sam.checkpoint {path}: holds a {type(state).__name__}, not a state dict")
    if isinstance(state.get("model"), dict):
        state = _student_of(state["model"], path)  # an rsiseg checkpoint: a PointSam's state dict
    state = {k: v for k, v in state.items() if k not in ("pixel_mean", "pixel_std")}
    state = _adapt_patch_embedding(state, sam, path)
    own = {k: v for k, v in sam.state_dict().items() if k not in ("pixel_mean", "pixel_std")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong)) if keys]
        raise ValueError(f"{path}: not a SAM state dict of this variant ({'; '.join(parts)}); "
                         "check model.name against the file (pointsam_vit_b / _vit_l / _vit_h)")
    sam.load_state_dict(state, strict=False)


def _student_of(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The SAM weights of a PointSam state dict (``sam.*``; the teacher and prototype bank are left out)."""
    if any(".lora_" in k for k in state):
        raise ValueError(f"{path}: a checkpoint trained with LoRA adapters (model.sam.trainable: lora) cannot start "
                         "another run; start from the SAM it was adapted from, or from a decoder/all checkpoint")
    student = {k[len("sam."):]: v for k, v in state.items() if k.startswith("sam.")}
    if not student:
        raise ValueError(f"{path}: holds no SAM weights (no 'sam.*' keys in its 'model' entry)")
    return student


def _adapt_patch_embedding(state: dict[str, torch.Tensor], sam: Sam, path: Path) -> dict[str, torch.Tensor]:
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state:
        return state
    weight, bands = state[key], sam.image_encoder.patch_embed.proj.in_channels
    if weight.shape[1] == bands:
        return state
    if weight.shape[1] != 3:
        raise ValueError(f"{path}: {key} has {weight.shape[1]} input bands; expected {bands} (model.in_channels)")
    grey = weight.mean(dim=1, keepdim=True) * (3.0 / bands)
    return {**state, key: grey.repeat(1, bands, 1, 1)}


def build_point_sam(cfg: ModelConfig, variant: str) -> PointSam:
    """PointSam on a SAM of ``variant`` with the weights of ``model.sam.checkpoint`` (if set)."""
    sam = build_sam(variant, cfg.in_channels, cfg.sam.checkpoint)
    model = PointSam(sam, image_mean=cfg.image_mean, image_std=cfg.image_std, options=cfg.sam)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.sam.parameters())
    log.info("PointSAM %s (%s mode): %s of %s SAM parameters train (%s)", variant, cfg.sam.mode, f"{trainable:,}",
             f"{total:,}", cfg.sam.trainable)
    return model


def build_pointsam_tiny(cfg: ModelConfig) -> PointSam:
    return build_point_sam(cfg, "tiny")


def build_pointsam_vit_b(cfg: ModelConfig) -> PointSam:
    return build_point_sam(cfg, "vit_b")


def build_pointsam_vit_l(cfg: ModelConfig) -> PointSam:
    return build_point_sam(cfg, "vit_l")


def build_pointsam_vit_h(cfg: ModelConfig) -> PointSam:
    return build_point_sam(cfg, "vit_h")
