"""PointSAM: the Segment Anything Model (the official ``segment-anything`` classes) fine-tuned from point prompts.

- :mod:`~rsiseg.models.sam.build`: the SAM variants (ViT-B/L/H as released, a tiny one), the official weights;
- :mod:`~rsiseg.models.sam.model`: :class:`PointSam`, the image contract, the answers and the three training modes;
- :mod:`~rsiseg.models.sam.pseudo_labels` and :mod:`~rsiseg.models.sam.calibration`: the teacher's pseudo-masks
  and negative prompt calibration;
- :mod:`~rsiseg.models.sam.prototypes`: prototype-based regularization (bank, clustering, Hungarian matching);
- :mod:`~rsiseg.models.sam.losses` (focal, dice, IoU prediction) and :mod:`~rsiseg.models.sam.views` (the
  student's strong view).

LoRA lives in :mod:`rsiseg.models.layers.lora`, shared by any family.
"""
