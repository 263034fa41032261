"""Initial backbone weights shared by every family: local checkpoints and stems for any band count."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def adapt_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A stem conv for ``in_channels`` bands initialised from the RGB one.

    Each new band gets the mean RGB filter scaled by ``3 / in_channels``, so that an image
    with equal bands yields the same activations as the RGB stem on a grey image.
    """
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    with torch.no_grad():
        mean_filter = conv.weight.mean(dim=1, keepdim=True)
        new.weight.copy_(mean_filter.repeat(1, in_channels, 1, 1) * (3.0 / in_channels))
    return new


def load_backbone_checkpoint(body: nn.Module, path: str | Path, ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load local backbone weights (a state dict, or a dict holding one under ``model``/``state_dict``).

    Keys may carry a ``module.`` or ``backbone.body.`` prefix; keys starting with one of
    ``ignore_prefixes`` (a classifier: ``fc.`` of a ResNet, ``classifier.`` of an EfficientNet)
    are dropped. Any other mismatch is an error naming the file.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"model.backbone_checkpoint: file not found: {path}") from None
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ValueError(f"model.backbone_checkpoint {path}: not a weights-only torch checkpoint "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(state, dict):
        raise ValueError(f"model.backbone_checkpoint {path}: expected a state dict, got {type(state).__name__}")
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module.").removeprefix("backbone.body."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(ignore_prefixes)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: backbone checkpoint does not fit: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    log.info("loaded backbone weights from %s", path)
