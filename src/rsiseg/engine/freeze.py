"""Two-stage training: the backbone frozen for the first ``train.freeze_backbone_epochs`` epochs.

The stage is a function of the epoch alone, so a run resumed at any iteration is in the stage the
uninterrupted run was. While frozen, the backbone's parameters get no gradient (the optimizer, built
with them, skips them: no update, no weight decay, no momentum) and its batch norms stay in eval
mode (their running statistics do not move). Stages that ``model.trainable_layers`` keeps frozen stay
frozen after the unfreeze. Any model whose feature extractor is at one of :data:`BACKBONE_PATHS` can
use it; the trainer knows no model.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)

# Where models keep their (usually pretrained) feature extractor: R-CNNs and YOLACT, the semantic model.
BACKBONE_PATHS = ("backbone.body", "encoder")


def backbone_of(model: nn.Module) -> nn.Module | None:
    """The model's feature extractor (the first of :data:`BACKBONE_PATHS` it has), or None."""
    for path in BACKBONE_PATHS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    return None


class BackboneFreeze:
    """Freezes and unfreezes a model's backbone by epoch.

    Args:
        model: the model being trained.
        epochs: the first stage's length in epochs (0: never frozen).

    Raises:
        ValueError: ``epochs > 0`` and the model has no backbone at :data:`BACKBONE_PATHS`.
    """

    def __init__(self, model: nn.Module, epochs: int) -> None:
        self.epochs = epochs
        body = backbone_of(model) if epochs else None
        if epochs and body is None:
            raise ValueError(f"train.freeze_backbone_epochs = {epochs} needs a model with a backbone at one of "
                             f"{', '.join(BACKBONE_PATHS)}; {type(model).__name__} has none")
        self.params = [p for p in body.parameters() if p.requires_grad] if body is not None else []
        self.norms = [m for m in body.modules() if isinstance(m, _BatchNorm)] if body is not None else []
        self.frozen = False

    def set_epoch(self, epoch: int) -> None:
        """Enter the stage of ``epoch`` (0-based): frozen while ``epoch < epochs``."""
        frozen = epoch < self.epochs
        if frozen == self.frozen:
            return
        for param in self.params:
            param.requires_grad_(not frozen)
        self.frozen = frozen
        log.info("epoch %d: backbone %s (%d parameter tensors)", epoch, "frozen" if frozen else "unfrozen",
                 len(self.params))

    def hold_norms(self) -> None:
        """Keep a frozen backbone's batch norms in eval mode; call after ``model.train()``."""
        if self.frozen:
            for norm in self.norms:
                norm.eval()
