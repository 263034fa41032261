"""A faster eval path that keeps the outputs: batch norms folded into their convolutions, channels-last.

In eval mode a BatchNorm (or torchvision's ``FrozenBatchNorm2d``) after a convolution is a fixed
per-channel affine map, so it can be folded into the convolution's weight and bias
(``torch.nn.utils.fusion.fuse_conv_bn_weights``); the model then runs one op where it ran three
(multiply, add and a memory pass). Only pairs whose wiring is certain are folded: consecutive
entries of an ``nn.Sequential``, and a parent's ``convK`` / ``bnK`` attributes (torchvision's ResNet
stems and blocks). Norms with extra behaviour (timm's ``BatchNormAct2d``, GroupNorm) are left alone.

Channels-last weights make the convolutions after them run in NHWC, which oneDNN (CPU) and cuDNN
favour; measured in ``bench/bench_fast_inference.py``.

The folded model is for inference only: its state dict differs from the checkpoint's.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops import FrozenBatchNorm2d

_FOLDABLE = (nn.BatchNorm2d, FrozenBatchNorm2d)
_CONV_NAME = re.compile(r"conv(\d+)$")


def _foldable_norm(module: nn.Module) -> bool:
    # Exact types: subclasses (e.g. timm's BatchNormAct2d) add behaviour; no running stats, nothing fixed.
    return type(module) in _FOLDABLE and getattr(module, "running_mean", None) is not None


def _pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, norm name)`` children of ``parent`` where the norm takes exactly that conv's output."""
    children = dict(parent.named_children())
    if isinstance(parent, nn.Sequential):
        names = list(children)
        return [(a, b) for a, b in zip(names, names[1:])
                if isinstance(children[a], nn.Conv2d) and _foldable_norm(children[b])]
    pairs = []
    for name, child in children.items():
        match = _CONV_NAME.fullmatch(name)
        norm = children.get(f"bn{match.group(1)}") if match else None
        if isinstance(child, nn.Conv2d) and norm is not None and _foldable_norm(norm):
            pairs.append((name, f"bn{match.group(1)}"))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every certain conv -> batch-norm pair of an eval-mode ``model`` in place.

    Returns:
        The number of norms folded (each replaced by ``nn.Identity``).

    Raises:
        RuntimeError: the model is in training mode (its norms are not fixed maps then).
    """
    if model.training:
        raise RuntimeError("fold_batchnorm needs a model in eval mode")
    folded = 0
    for parent in list(model.modules()):
        for conv_name, norm_name in _pairs(parent):
            conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                                norm.eps, norm.weight, norm.bias)
            conv.weight, conv.bias = weight, bias
            setattr(parent, norm_name, nn.Identity())
            folded += 1
    return folded


def prepare_for_inference(model: nn.Module, channels_last: bool = False) -> dict[str, int | bool]:
    """Put ``model`` in eval mode, fold its batch norms and optionally store its convolution weights channels-last.

    Returns:
        What was done: ``folded`` norms and ``channels_last``.
    """
    model.eval()
    folded = fold_batchnorm(model)
    if channels_last:  # convolution weights only: other 4-D parameters (e.g. Fourier weights) keep their layout
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return {"folded": folded, "channels_last": channels_last}
