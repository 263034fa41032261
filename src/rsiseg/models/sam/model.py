"""PointSam: SAM answering point (and box) prompts, fine-tuned by one of three modes.

Frames. An image (float ``[C, H, W]`` in [0, 1]) is resized so its long side is the variant's input
side S (1024; tiny 256), normalised with ``model.image_mean``/``image_std`` and padded bottom-right to
``S x S``: the *input frame*. Point and box prompts are given in the image's pixels and scaled by the
same factor. The decoder answers at ``L x L`` with ``L = 4 e`` (the *low-res frame*; e = S / patch, the
embedding side: L is 256 for ViT, 128 for tiny):
losses, pseudo-masks and prototypes live there; answers are resized back to ``H x W``.

Training (``forward(images, targets)``, targets with ``points`` float ``[N, 2]`` (x, y) and, for the
supervised mode, ``masks``) returns ``loss_focal``, ``loss_dice``, ``loss_iou`` (and ``loss_proto``):

- ``supervised``: the ground-truth masks, each prompted by its point;
- ``self_training``: an EMA teacher answers the points on the image (the weak view); the student
  learns those pseudo-masks from a strongly augmented view (:mod:`rsiseg.models.sam.views`);
- ``pointsam``: self-training plus negative prompt calibration and prototype regularization
  (:mod:`rsiseg.models.sam.pseudo_labels`).

Each image is encoded once per step (and once by the teacher); every prompt of the image reuses it.
With a frozen encoder, ``model.sam.embedding_cache`` keeps the embeddings of the views that recur on
disk (:mod:`rsiseg.models.sam.embedding_cache`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import Tensor, nn

from rsiseg.config import SamConfig
from rsiseg.models.layers.lora import add_lora
from rsiseg.models.sam.embedding_cache import EmbeddingCache
from rsiseg.models.sam.losses import dice_loss, focal_loss, sam_losses
from rsiseg.models.sam.prototypes import PrototypeBank, gather_rows, masked_average_pool, prototype_loss
from rsiseg.models.sam.pseudo_labels import teacher_pseudo_masks
from rsiseg.models.sam.views import strong_view
from rsiseg.structures import masks_to_boxes

PROMPT_CHUNK = 64  # prompts decoded at once at inference: the decoder repeats the image embedding per prompt


def to_sam_coordinates(coords: Tensor, scale: float) -> Tensor:
    """Continuous image coordinates (pixel ``(c, r)`` covers ``[c, c + 1)``) into SAM's input frame.

    SAM's prompt encoder reads a coordinate as a pixel index and adds 0.5 to reach its centre, so the
    continuous value is scaled and moved back half a pixel: ``x * scale - 0.5``. Works for points
    ``[..., 2]`` and boxes ``[..., 4]`` alike.
    """
    return coords * scale - 0.5


def frame_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """``(H, W)`` of an image of ``size`` scaled by ``scale``: the part of a padded frame the image fills."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


@dataclass
class Encoded:
    """Images encoded once, for any number of later prompts.

    Attributes:
        embeddings: float ``[B, D, e, e]`` image embeddings (``e = S / patch``: 64 for ViT, 32 for tiny).
        scales: input-frame pixels per image pixel, one per image.
        sizes: each image's ``(H, W)``.
    """

    embeddings: Tensor
    scales: list[float]
    sizes: list[tuple[int, int]]


class PointSam(nn.Module):
    """SAM with rsiseg's image contract and the PointSAM training modes.

    Args:
        sam: a :class:`segment_anything.modeling.Sam` (see :func:`~rsiseg.models.sam.build.build_sam`),
            with its weights already loaded.
        image_mean, image_std: per band, on the [0, 1] scale.
        options: the ``model.sam`` section (mode, what trains, loss weights, teacher and prototype options).
    """

    def __init__(self, sam: Sam, *, image_mean: Sequence[float], image_std: Sequence[float],
                 options: SamConfig) -> None:
        super().__init__()
        self.options = options
        if options.trainable == "lora":
            add_lora(sam.image_encoder, options.lora_rank)
        self.sam = sam
        self._freeze()  # before the teacher is made: it shares what never trains
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # training steps taken (EMA, reclustering)
        self.teacher: Sam | None = None
        self.bank: PrototypeBank | None = None
        if options.mode != "supervised":
            self.teacher = _ema_copy(sam)
        if options.mode == "pointsam" and options.prototype_weight > 0:
            self.bank = PrototypeBank(sam.prompt_encoder.embed_dim, options.prototype_bank, options.num_prototypes)
        self.cache: EmbeddingCache | None = None
        if options.embedding_cache:
            self.cache = EmbeddingCache(options.embedding_cache, sam.image_encoder, (image_mean, image_std),
                                        self.image_size)
            sam.image_encoder.register_load_state_dict_post_hook(self.cache.forget_fingerprint)

    @property
    def image_size(self) -> int:
        return self.sam.image_encoder.img_size

    @property
    def low_res(self) -> int:
        return 4 * self.sam.prompt_encoder.image_embedding_size[0]

    def _freeze(self) -> None:
        """Only ``trainable: all`` (pretraining) trains the prompt and image encoders; ``lora`` trains the encoder's
        adapters; the mask decoder always trains."""
        if self.options.trainable == "all":
            return
        self.sam.prompt_encoder.requires_grad_(False)
        if self.options.trainable == "decoder":
            self.sam.image_encoder.requires_grad_(False)
        elif self.options.trainable == "lora":
            for name, param in self.sam.image_encoder.named_parameters():
                param.requires_grad_("lora_" in name)

    # ----------------------------------------------------------------- frames and encoding

    def prepare(self, image: Tensor) -> tuple[Tensor, float]:
        """One image into the input frame: resized (long side S), normalised, padded to ``[C, S, S]``."""
        scale = self.image_size / max(image.shape[-2:])
        size = frame_size(image.shape[-2:], scale)
        resized = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        normed = (resized - self.image_mean) / self.image_std
        return F.pad(normed, (0, self.image_size - size[1], 0, self.image_size - size[0])), scale

    def encode(self, images: Sequence[Tensor], encoder: Sam | None = None, cache: bool = False) -> Encoded:
        """Encode ``images`` (each ``[C, H, W]`` in [0, 1]) with ``encoder`` (default the student); ``cache``:
        through the embedding cache, when there is one (views that recur: not the strong views)."""
        prepared = [self.prepare(image) for image in images]
        image_encoder = (encoder or self.sam).image_encoder
        if cache and self.cache is not None and image_encoder is self.cache.encoder:
            embeddings = self._cached_embeddings(images, [x for x, _ in prepared])
        else:
            embeddings = image_encoder(torch.stack([x for x, _ in prepared]))
        return Encoded(embeddings, [s for _, s in prepared], [tuple(i.shape[-2:]) for i in images])

    def _cached_embeddings(self, images: Sequence[Tensor], frames: list[Tensor]) -> Tensor:
        """``[B, D, e, e]`` embeddings read from the cache, the missing ones encoded and stored."""
        assert self.cache is not None
        keys = [self.cache.key(image) for image in images]
        found = [self.cache.read(key, frames[0].device) for key in keys]
        missing = [i for i, embedding in enumerate(found) if embedding is None]
        if missing:
            fresh = self.cache.encoder(torch.stack([frames[i] for i in missing]))
            for i, embedding in zip(missing, fresh):
                self.cache.write(keys[i], embedding)
                found[i] = embedding.half()
        self.cache.hits += len(images) - len(missing)
        self.cache.misses += len(missing)
        return torch.stack(found).to(frames[0].dtype)  # through float16 either way: the same numbers, cold or warm

    def decode(self, embedding: Tensor, points: Tensor | None, point_labels: Tensor | None, boxes: Tensor | None = None,
               multimask: bool = False, model: Sam | None = None) -> tuple[Tensor, Tensor]:
        """Answer N prompts on one image embedding.

        Args:
            embedding: float ``[1, D, e, e]``.
            points: float ``[N, P, 2]`` (x, y) in the input frame, or None (boxes only); ``point_labels``
                ``[N, P]`` (1 positive, 0 negative, -1 padding).
            boxes: optional float ``[N, 4]`` xyxy in the input frame.
            multimask: the three ambiguity-resolving masks instead of the single one.

        Returns:
            ``(logits float [N, M, L, L], predicted IoU float [N, M])``, M = 3 or 1.
        """
        sam = model or self.sam
        pairs = (points, point_labels) if points is not None else None
        sparse, dense = sam.prompt_encoder(points=pairs, boxes=boxes, masks=None)
        return sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=multimask)

    # ----------------------------------------------------------------- forward

    def forward(self, images: list[Tensor], targets: list[dict[str, Any]] | None = None,
                prompts: list[dict[str, Tensor]] | None = None) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: ``(images, targets)`` -> losses. Eval: ``(images, prompts=...)`` -> one answer dict per image.

        Each prompt dict holds ``points`` float ``[N, 2]`` or ``[N, P, 2]`` (x, y image pixels),
        optionally ``point_labels`` int ``[N, P]``, ``boxes`` float ``[N, 4]`` and ``labels`` int64 ``[N]``
        (the classes the answers carry; default 1). Answers: ``masks`` float ``[N, 1, H, W]``
        probabilities, ``scores`` (predicted IoU), ``boxes`` (of the masks), ``labels``.
        """
        if self.training:
            if targets is None:
                raise ValueError("PointSam needs targets in training mode")
            return self.losses(images, targets)
        if prompts is None:
            raise ValueError("PointSam answers prompts: call it with prompts=[{'points': ...}] per image "
                             "(it does not detect objects by itself)")
        encoded = self.encode(images)
        return [self.answer(encoded, i, **p) for i, p in enumerate(prompts)]

    @torch.no_grad()
    def answer(self, encoded: Encoded, index: int, points: Tensor | None = None, point_labels: Tensor | None = None,
               boxes: Tensor | None = None, labels: Tensor | None = None) -> dict[str, Tensor]:
        """Answer one image's prompts from its cached embedding (see :meth:`forward` for the fields)."""
        coords, flags, frame_boxes = self._input_prompts(encoded.scales[index], points, point_labels, boxes)
        count = len(coords if coords is not None else frame_boxes)
        embedding = encoded.embeddings[index:index + 1]
        multimask = self._multimask(coords, frame_boxes)
        logits, scores = [], []
        for start in range(0, count, PROMPT_CHUNK):
            part = slice(start, start + PROMPT_CHUNK)
            chunk_logits, chunk_iou = self.decode(
                embedding, coords[part] if coords is not None else None, flags[part] if flags is not None else None,
                frame_boxes[part] if frame_boxes is not None else None, multimask)
            best = chunk_iou.argmax(dim=1)
            rows = torch.arange(len(best), device=best.device)
            chosen = chunk_logits[rows, best]
            logits.append(self.to_image(chosen, encoded.scales[index], encoded.sizes[index]).sigmoid())
            scores.append(chunk_iou[rows, best])
        masks = torch.cat(logits) if logits else embedding.new_zeros((0, *encoded.sizes[index]))
        return {"masks": masks[:, None], "scores": torch.cat(scores).clamp(0, 1) if scores else masks.new_zeros(0),
                "boxes": masks_to_boxes(masks > 0.5),
                "labels": labels if labels is not None else torch.ones(count, dtype=torch.int64, device=masks.device)}

    def _multimask(self, coords: Tensor | None, boxes: Tensor | None) -> bool:
        """SAM's rule: a lone point is ambiguous (3 candidates); more points or a box are not (1 answer)."""
        return self.options.multimask and boxes is None and coords is not None and coords.shape[1] == 1

    def _input_prompts(self, scale: float, points: Tensor | None, point_labels: Tensor | None,
                       boxes: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if points is None and boxes is None:
            raise ValueError("a prompt needs points or boxes")
        coords = flags = None
        if points is not None:
            coords = to_sam_coordinates((points[:, None] if points.dim() == 2 else points).float(), scale)
            flags = point_labels if point_labels is not None else torch.ones(coords.shape[:2], device=coords.device)
            flags = flags.reshape(coords.shape[:2]).to(coords.device)
        return coords, flags, to_sam_coordinates(boxes.float(), scale) if boxes is not None else None

    def to_image(self, low: Tensor, scale: float, size: tuple[int, int]) -> Tensor:
        """Low-res logits ``[N, L, L]`` back to the image: ``[N, H, W]`` logits."""
        if len(low) == 0:
            return low.new_zeros((0, *size))
        frame = F.interpolate(low[:, None], size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False)
        height, width = frame_size(size, scale)
        valid = frame[..., :height, :width]
        return F.interpolate(valid, size=size, mode="bilinear", align_corners=False)[:, 0]

    # ----------------------------------------------------------------- training

    def losses(self, images: list[Tensor], targets: list[dict[str, Any]]) -> dict[str, Tensor]:
        """The training losses of one batch (see the module docstring for the modes)."""
        if self.teacher is not None:
            self._update_teacher()
        self.steps += 1
        picks = [self._pick(t) for t in targets]
        if self.options.mode == "supervised":
            encoded = self.encode(images, cache=True)
            goals = [self._mask_targets(t, keep, s, size) for t, keep, s, size
                     in zip(targets, picks, encoded.scales, encoded.sizes)]
            weights = [g.new_ones(len(g)) for g in goals]
        else:
            goals, weights = self._pseudo_labels(images, targets, picks)
            encoded = self.encode([strong_view(image, self.options) for image in images])
        logits, iou = self._student_answers(encoded, targets, picks, goals)
        losses = sam_losses(logits, torch.cat(goals), iou, torch.cat(weights), self.options.focal_weight,
                            self.options.dice_weight, self.options.iou_weight)
        if self.bank is not None:
            losses["loss_proto"] = self.options.prototype_weight * self._prototype_loss(encoded, logits, picks)
        return losses

    def _pick(self, target: dict[str, Any]) -> Tensor:
        """Indices of the instances prompted this step: all, or a random ``prompts_per_image`` of them."""
        count = len(target["points"])
        if count <= self.options.prompts_per_image:
            return torch.arange(count)
        return torch.randperm(count)[: self.options.prompts_per_image].sort().values

    def _points(self, target: dict[str, Any], keep: Tensor, scale: float) -> Tensor:
        return to_sam_coordinates(target["points"][keep.to(target["points"].device)].float(), scale)

    def _mask_targets(self, target: dict[str, Any], keep: Tensor, scale: float, size: tuple[int, int]) -> Tensor:
        """Ground-truth masks of the picked instances in the low-res frame: float ``[N, L, L]`` in [0, 1]."""
        device = self.image_mean.device
        if len(keep) == 0:
            return torch.zeros((0, self.low_res, self.low_res), device=device)
        full = target["masks"][keep.tolist()].to_full().to(device=device, dtype=torch.float32)
        return self.to_low_res(full, scale)

    def to_low_res(self, masks: Tensor, scale: float) -> Tensor:
        """Image-frame masks ``[N, H, W]`` into the low-res frame ``[N, L, L]`` (resized, padded)."""
        size = frame_size(masks.shape[-2:], scale * self.low_res / self.image_size)
        small = F.interpolate(masks[:, None], size=size, mode="bilinear", align_corners=False, antialias=True)[:, 0]
        return F.pad(small, (0, self.low_res - size[1], 0, self.low_res - size[0]))

    def _student_answers(self, encoded: Encoded, targets: list[dict[str, Any]], picks: list[Tensor],
                         goals: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The student's logits ``[N, L, L]`` and predicted IoU ``[N]`` for every picked prompt of the batch.

        In the supervised mode a ``box_prompts`` share of the instances is prompted by its box instead of
        its point, as SAM itself trains (boxes teach the decoder where an object lies much sooner)."""
        logits, ious = [], []
        for i, (target, keep, goal) in enumerate(zip(targets, picks, goals)):
            if len(keep) == 0:
                continue
            scale, embedding = encoded.scales[i], encoded.embeddings[i:i + 1]
            boxed = torch.zeros(len(keep), dtype=torch.bool)
            if self.options.mode == "supervised" and self.options.box_prompts > 0:
                boxed = torch.rand(len(keep)) < self.options.box_prompts
            out = torch.empty((len(keep), self.low_res, self.low_res), device=goal.device)
            iou = torch.empty(len(keep), device=goal.device)
            parts = [(~boxed, self._points(target, keep, scale)[:, None], None)]
            if boxed.any():  # (point-file targets have no boxes; they train no supervised mode)
                parts.append((boxed, None, to_sam_coordinates(
                    target["boxes"][keep.to(target["boxes"].device)].float(), scale)))
            for rows, coords, boxes in parts:
                if rows.any():
                    rows = rows.to(goal.device)
                    flags = torch.ones(coords.shape[:2], device=coords.device) if coords is not None else None
                    answer, answer_iou = self._best_of(embedding, coords[rows] if coords is not None else None,
                                                       flags[rows] if flags is not None else None,
                                                       boxes[rows] if boxes is not None else None, goal[rows])
                    out, iou = out.index_put((rows,), answer), iou.index_put((rows,), answer_iou)
            logits.append(out)
            ious.append(iou)
        if not logits:
            zero = sum(p.sum() for p in self.sam.mask_decoder.parameters()) * 0.0
            return zero.expand(0, self.low_res, self.low_res), zero.expand(0)
        return torch.cat(logits), torch.cat(ious)

    def _best_of(self, embedding: Tensor, coords: Tensor | None, flags: Tensor | None, boxes: Tensor | None,
                 goal: Tensor) -> tuple[Tensor, Tensor]:
        """Decode; with ``multimask``, of the three candidates the one with the lowest loss against ``goal``
        trains (SAM's rule for ambiguous prompts). Returns ``([N, L, L], [N])``."""
        out, iou = self.decode(embedding, coords, flags, boxes, multimask=self._multimask(coords, boxes))
        if out.shape[1] > 1:
            with torch.no_grad():
                flat, goal_flat = out.flatten(0, 1), goal.repeat_interleave(out.shape[1], 0)
                cost = (self.options.focal_weight * focal_loss(flat, goal_flat)
                        + self.options.dice_weight * dice_loss(flat, goal_flat))
            best = cost.view(-1, out.shape[1]).argmin(dim=1)
            rows = torch.arange(len(best), device=best.device)
            return out[rows, best], iou[rows, best]
        return out[:, 0], iou[:, 0]

    def _pseudo_labels(self, images: list[Tensor], targets: list[dict[str, Any]],
                       picks: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The teacher's pseudo-masks ``[N, L, L]`` of the picked instances and their weights ``[N]`` (0 below
        ``confidence``). The teacher answers every point of the image, so that calibration sees every
        neighbour, not only the instances picked this step."""
        assert self.teacher is not None
        with torch.no_grad():
            encoded = self.encode(images, encoder=self.teacher, cache=True)
            goals, weights, protos = [], [], []
            for i, (target, keep) in enumerate(zip(targets, picks)):
                every = torch.arange(len(target["points"]))
                masks, iou = teacher_pseudo_masks(self, encoded.embeddings[i:i + 1],
                                                  self._points(target, every, encoded.scales[i]))
                masks = self._clear_padding(masks, encoded.scales[i], encoded.sizes[i])[keep.to(masks.device)]
                goals.append(masks)
                weights.append((iou[keep.to(iou.device)] >= self.options.confidence).float())
                if self.bank is not None and len(masks):
                    pooled, valid = masked_average_pool(encoded.embeddings[i:i + 1], masks,
                                                        torch.zeros(len(masks), dtype=torch.int64,
                                                                    device=masks.device))
                    protos.append(pooled[valid & (weights[-1] > 0)])
            if self.bank is not None:  # every rank pushes every rank's prototypes: the banks stay equal
                dim = self.bank.dim
                self.bank.push(gather_rows(torch.cat(protos) if protos else encoded.embeddings.new_zeros((0, dim))))
        return goals, weights

    def _clear_padding(self, masks: Tensor, scale: float, size: tuple[int, int]) -> Tensor:
        """Low-res masks ``[N, L, L]`` with the padded part of the frame (no image there) set to 0."""
        height, width = frame_size(size, scale * self.low_res / self.image_size)
        masks = masks.clone()
        masks[:, height:, :] = 0
        masks[:, :, width:] = 0
        return masks

    def _prototype_loss(self, encoded: Encoded, logits: Tensor, picks: list[Tensor]) -> Tensor:
        """Hungarian-matched distance of the student's instance prototypes to the clustered target prototypes."""
        assert self.bank is not None
        if (int(self.steps) - 1) % self.options.prototype_interval == 0 or int(self.bank.num_centres) == 0:
            self.bank.recluster(seed=int(self.steps))
        image_index = torch.cat([torch.full((len(k),), i, dtype=torch.int64) for i, k in enumerate(picks)])
        protos, valid = masked_average_pool(encoded.embeddings, logits.sigmoid(), image_index.to(logits.device))
        return prototype_loss(protos[valid], self.bank.targets())

    @torch.no_grad()
    def _update_teacher(self) -> None:
        """EMA of the student: ``teacher = m * teacher + (1 - m) * student`` (the first step copies nothing new)."""
        assert self.teacher is not None
        momentum = self.options.ema_momentum
        for mine, theirs in zip(self.teacher.parameters(), self.sam.parameters()):
            if mine is not theirs:  # a frozen part is shared, not copied
                mine.lerp_(theirs.detach(), 1.0 - momentum)

    def decode_all(self, embedding: Tensor, points: Tensor, point_labels: Tensor, multimask: bool,
                   model: Sam | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`decode` without gradients, ``PROMPT_CHUNK`` prompts at a time (the decoder repeats the image
        embedding once per prompt): ``(logits [N, M, L, L], IoU [N, M])``."""
        with torch.no_grad():
            parts = [self.decode(embedding, points[i:i + PROMPT_CHUNK], point_labels[i:i + PROMPT_CHUNK],
                                 multimask=multimask, model=model) for i in range(0, len(points), PROMPT_CHUNK)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _ema_copy(sam: Sam) -> Sam:
    """The teacher: a frozen copy of every part of ``sam`` that trains; the parts that never train are shared."""
    def own(module: nn.Module) -> nn.Module:
        if not any(p.requires_grad for p in module.parameters()):
            return module
        return copy.deepcopy(module).requires_grad_(False)

    bands = sam.pixel_mean.numel()
    return Sam(image_encoder=own(sam.image_encoder), prompt_encoder=own(sam.prompt_encoder),
               mask_decoder=own(sam.mask_decoder), pixel_mean=[0.0] * bands, pixel_std=[1.0] * bands)
