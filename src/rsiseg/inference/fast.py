"""A faster eval path that keeps the outputs: batch norms folded into their convolutions, channels-last.

In eval mode a BatchNorm (or torchvision's ``FrozenBatchNorm2d``) after a convolution is a fixed
per-channel affine map, so it can be folded into the convolution's weight and bias
(``torch.nn.utils.fusion.fuse_conv_bn_weights``); the model then runs one op where it ran three
(multiply, add and a memory pass). Only pairs whose wiring is certain are folded: consecutive
entries of an ``nn.Sequential``, and a parent's ``convK`` / ``bnK`` attributes (torchvision's ResNet
stems and blocks). Norms with extra behaviour (timm's ``BatchNormAct2d``, GroupNorm) are left alone.

Channels-last weights make the convolutions after them run in NHWC, which oneDNN (CPU) and cuDNN
favour; measured in ``bench/bench_fast_inference.py``.

Two further options, off by default until a GPU run of that bench shows where they pay:

* ``precision``: the forward pass under ``torch.autocast`` in bf16 (CPU or CUDA) or fp16 (CUDA), its
  floating outputs returned as float32. Only ``forward`` is wrapped: the cached-image prompt path of
  :class:`~rsiseg.inference.predictor.Predictor` still runs in float32.
* ``compile``: the backbone (with its FPN) through ``torch.compile``, in place, so the state dict's
  keys and the model's attributes do not change. The first batch of each new shape pays the compile.

The folded model is for inference only: its state dict differs from the checkpoint's.
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops import FrozenBatchNorm2d

log = logging.getLogger(__name__)

_FOLDABLE = (nn.BatchNorm2d, FrozenBatchNorm2d)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FastOptions:
    """How ``predict`` and ``eval`` run a checkpoint.

    Attributes:
        fold: batch norms folded into their convolutions and convolution weights channels-last (off with ``--exact``).
        precision: ``fp32``, or the autocast dtype of the forward pass (``bf16``, ``fp16`` on CUDA only).
        compile: the backbone through ``torch.compile``.
    """

    fold: bool = True
    precision: str = "fp32"
    compile: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FastOptions:
        """The options of a command line with ``--exact``, ``--precision`` and ``--compile``."""
        return cls(fold=not args.exact, precision=args.precision, compile=args.compile)

    def apply(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Prepare the eval-mode ``model`` on ``device`` in place; returns it.

        Raises:
            ValueError: an unknown precision, or fp16 off CUDA (CPU autocast runs bf16).
        """
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.precision == "fp16" and device.type != "cuda":
            raise ValueError(f"--precision fp16 needs a CUDA device (got {device}); on CPU use bf16")
        model.eval()
        if self.fold:
            prepare_for_inference(model, channels_last=True)
        dtype = PRECISIONS[self.precision]
        if dtype is not None:
            run_under_autocast(model, device.type, dtype)
        if self.compile:
            compile_backbone(model)
        return model
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


def run_under_autocast(model: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Make ``model``'s forward run under ``torch.autocast(device_type, dtype)``, its floating outputs cast back
    to float32 (boxes, scores and masks keep the dtype callers expect)."""
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=dtype):
            out = forward(*args, **kwargs)
        return _as_float32(out)

    model.forward = autocast_forward


def _as_float32(out: Any) -> Any:
    """``out`` (tensors in dicts, lists and tuples) with every floating tensor as float32."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: _as_float32(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_as_float32(v) for v in out)
    return out


def compile_backbone(model: nn.Module) -> bool:
    """``torch.compile`` the model's ``backbone`` in place; False (with a warning) when it has none."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        log.warning("%s has no backbone attribute: --compile leaves it as it is", type(model).__name__)
        return False
    backbone.compile()
    return True
