"""The prompt paradigm of Insight Any Instance on an R-CNN: ``maskrcnn_*_prompt``, ``cascade_maskrcnn_*_prompt``.

Every part is a switch in ``model.prompt`` (:class:`~rsiseg.config.PromptConfig`), so the paper's
ablation is a matter of config overrides:

- ``lpm`` / ``gpm``: the local and global-to-local prompt modules, fused into the RoI features of
  the mask head (and the box head with ``fuse: mask_box``) by
  :class:`~rsiseg.models.prompt.fusion.PromptFusion`, the RoI heads' ``prompter``;
- ``parea_weight``: the proposals' area loss on the RPN
  (:class:`~rsiseg.models.prompt.area_loss.AreaLossRegionProposalNetwork`);
- ``gt_prompt_ratio``: jittered ground-truth boxes mixed into the mask branch's RoIs in training
  (:class:`~rsiseg.models.prompt.gt_prompts.JitteredGtPrompts`), so that user boxes work as prompts.

With every switch off, nothing is built beyond the baseline, in the same order: the model has the
baseline's parameters and, for the same seed, its outputs. The prompt modules are initialised from a
fork of the RNG, so with them on, every part the baseline has starts from the baseline's weights: the
variants of an ablation differ in their switches, not in their initialisation. Inputs and outputs follow the Mask R-CNN
contract of :mod:`rsiseg.models.mask_rcnn`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from rsiseg.config import ModelConfig
from rsiseg.models.backbones.resnet_fpn import resnet_fpn_from_config
from rsiseg.models.layers.box_matching import DenseRegionProposalNetwork
from rsiseg.models.layers.box_prompting import encode_images, prompt_context, segment_boxes
from rsiseg.models.layers.cascade_heads import CascadeMaskRoIHeads, cascade_roi_heads_parts
from rsiseg.models.layers.rcnn_assembly import RoIHeadParts, assemble_mask_rcnn
from rsiseg.models.layers.roi_heads import CompactMaskRoIHeads
from rsiseg.models.prompt.area_loss import AreaLossRegionProposalNetwork
from rsiseg.models.prompt.fusion import PromptFusion
from rsiseg.models.prompt.gt_prompts import JitteredGtPrompts


class PromptRCNN(GeneralizedRCNN):
    """torchvision's R-CNN whose RoI heads also get the prompter's encoding of the input images, and
    which answers box prompts (the promptable-model contract of ``../shared/DESIGN.md``)."""

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None,
                prompts: list[dict[str, Tensor]] | None = None) -> Any:
        """Training: per-image ``[C, H, W]`` images and targets -> dict of losses. Eval: detections, or with
        ``prompts=[{"boxes": [K_i, 4]}]`` (xyxy image pixels) one answer per box, as
        :func:`~rsiseg.models.layers.box_prompting.segment_boxes` gives it."""
        if prompts is not None:
            return self.answer_boxes(images, prompts)
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training mode")
            check_target_boxes(targets)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets)
        features = self.backbone(batch.tensors)
        proposals, proposal_losses = self.rpn(batch, features, targets)
        detections, detector_losses = self.roi_heads(
            features, proposals, batch.image_sizes, targets, prompt_context=prompt_context(self, images, batch),
        )
        if self.training:
            return {**detector_losses, **proposal_losses}
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def answer_boxes(self, images: list[Tensor], prompts: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """One mask, class and score per prompt box of each image (eval mode only)."""
        if self.training:
            raise ValueError("box prompts are answered in eval mode; call model.eval() first")
        if len(prompts) != len(images) or any("boxes" not in p for p in prompts):
            raise ValueError(f"prompts must be one {{'boxes': [K, 4]}} dict per image: got {len(prompts)} "
                             f"for {len(images)} images")
        if any(key != "boxes" for p in prompts for key in p):
            raise ValueError("these R-CNN models take box prompts only, not points")
        return segment_boxes(self, encode_images(self, images), [p["boxes"] for p in prompts])


def check_target_boxes(targets: list[dict[str, Tensor]]) -> None:
    """Refuse a target box without positive width and height (torchvision's check, which the baseline
    R-CNN's forward makes): it would give infinite box-regression and area losses."""
    for index, target in enumerate(targets):
        boxes = target["boxes"]
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            raise ValueError(f"every target box needs a positive width and height: target {index} has "
                             f"{boxes[bad][0].tolist()} ({int(bad.sum())} such boxes)")


def assemble_prompt_rcnn(
    backbone: nn.Module, cfg: ModelConfig, heads: RoIHeadParts | None = None,
    roi_heads_cls: type[CompactMaskRoIHeads] = CompactMaskRoIHeads, roi_heads_kwargs: dict[str, Any] | None = None,
) -> GeneralizedRCNN:
    """:func:`~rsiseg.models.layers.rcnn_assembly.assemble_mask_rcnn` with the parts ``cfg.prompt`` switches on."""
    options = cfg.prompt
    roi_kwargs = dict(roi_heads_kwargs or {})
    if options.lpm or options.gpm:
        with torch.random.fork_rng(devices=[]):  # its initialisation leaves the RNG as the baseline's parts find it
            roi_kwargs["prompter"] = PromptFusion(options, cfg.in_channels, backbone.out_channels)
    if options.gt_prompt_ratio > 0:
        roi_kwargs["mask_rois"] = JitteredGtPrompts(options.gt_prompt_ratio, options.gt_prompt_jitter)
    area = options.parea_weight > 0
    return assemble_mask_rcnn(
        backbone, cfg, heads,
        rpn_cls=AreaLossRegionProposalNetwork if area else DenseRegionProposalNetwork,
        rpn_kwargs={"area_weight": options.parea_weight, "area_iou_floor": options.parea_iou_floor} if area else None,
        roi_heads_cls=roi_heads_cls, roi_heads_kwargs=roi_kwargs, model_cls=PromptRCNN,
    )


def build_maskrcnn_r18_prompt(cfg: ModelConfig) -> GeneralizedRCNN:
    """Mask R-CNN R18-FPN with the prompt parts ``cfg.prompt`` switches on (the CPU-sized variant)."""
    return assemble_prompt_rcnn(resnet_fpn_from_config(cfg, "resnet18"), cfg)


def build_maskrcnn_r50_prompt(cfg: ModelConfig) -> GeneralizedRCNN:
    """Mask R-CNN R50-FPN with the prompt parts ``cfg.prompt`` switches on (the paper's model)."""
    return assemble_prompt_rcnn(resnet_fpn_from_config(cfg, "resnet50"), cfg)


def build_cascade_prompt(cfg: ModelConfig, depth_name: str) -> GeneralizedRCNN:
    """Cascade Mask R-CNN on a ResNet-FPN with the prompt parts ``cfg.prompt`` switches on."""
    backbone = resnet_fpn_from_config(cfg, depth_name)
    heads, roi_kwargs = cascade_roi_heads_parts(backbone.out_channels, cfg)
    return assemble_prompt_rcnn(backbone, cfg, heads, CascadeMaskRoIHeads, roi_kwargs)


def build_cascade_maskrcnn_r18_prompt(cfg: ModelConfig) -> GeneralizedRCNN:
    """Cascade Mask R-CNN R18-FPN with the prompt parts (the CPU-sized variant)."""
    return build_cascade_prompt(cfg, "resnet18")


def build_cascade_maskrcnn_r50_prompt(cfg: ModelConfig) -> GeneralizedRCNN:
    """Cascade Mask R-CNN R50-FPN with the prompt parts (the paper's Cascade model)."""
    return build_cascade_prompt(cfg, "resnet50")
