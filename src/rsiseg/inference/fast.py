"""A faster eval path that keeps the outputs: batch norms folded into their convolutions, channels-last.

In eval mode a BatchNorm (or torchvision's ``FrozenBatchNorm2d``) after a convolution is a fixed
per-channel affine map, so it can be folded into the convolution's weight and bias
(``torch.nn.utils.fusion.fuse_conv_bn_weights``); the model then runs one op where it ran three
(multiply, add and a memory pass). Only pairs whose wiring is certain are folded: consecutive
entries of an ``nn.Sequential``, and a parent's ``convK`` / ``bnK`` attributes (torchvision's ResNet
stems and blocks). Norms with extra behaviour (timm's ``BatchNormAct2d``, GroupNorm) are left alone.

Channels-last weights make the convolutions after them run in NHWC, which oneDNN (CPU) and cuDNN
favour; measured in ``bench/bench_fast_inference.py``.

Two further options act on the feature extractor only (the ``backbone`` with its FPN, or a semantic
model's ``encoder``), where the convolutions' time goes. Both are off by default: on the dev CPU (with
avx512_bf16) bf16 ran 1.3-1.5x faster but moved AP by up to 0.17, compile gave 1.03-1.10x
(BENCHMARKS.md), and no GPU has measured them yet:

* ``precision``: the feature extractor under ``torch.autocast`` in bf16 (CPU or CUDA) or fp16 (CUDA),
  its features handed on as float32. The heads, box decoding, softmax, NMS and mask paste stay in
  float32: bf16 box coordinates would sit on a 4 px grid at 800 px, and bf16 scores would round the
  score threshold.
* ``compile``: the feature extractor through ``torch.compile``, in place, so the state dict's keys and
  the model's attributes do not change. The first batch of each new shape pays the compile.

The folded model is for inference only: its state dict differs from the checkpoint's.
"""

from __future__ import annotations

import argparse
import functools
import re
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops import FrozenBatchNorm2d

_FOLDABLE = (nn.BatchNorm2d, FrozenBatchNorm2d)
_CONV_NAME = re.compile(r"conv(\d+)$")
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FastOptions:
    """How ``predict`` and ``eval`` run a checkpoint.

    Attributes:
        fold: batch norms folded into their convolutions and convolution weights channels-last (off with ``--exact``).
        precision: ``fp32``, or the autocast dtype of the feature extractor (``bf16``, ``fp16`` on CUDA only).
        compile: the feature extractor through ``torch.compile``.
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
            ValueError: an unknown precision, fp16 off CUDA (CPU autocast runs bf16), or ``precision`` or
                ``compile`` asked of a model without a feature extractor.
        """
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.precision == "fp16" and device.type != "cuda":
            raise ValueError(f"--precision fp16 needs a CUDA device (got {device}); on CPU use bf16")
        dtype = PRECISIONS[self.precision]
        features = feature_extractor(model) if dtype is not None or self.compile else None
        model.eval()
        if self.fold:
            prepare_for_inference(model, channels_last=True)
        if dtype is not None:
            run_under_autocast(features, device.type, dtype)
        if self.compile:
            features.compile()
        return model


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


FEATURE_EXTRACTORS = ("backbone", "encoder")  # the attribute naming it: R-CNNs and YOLACT, semantic models


def feature_extractor(model: nn.Module) -> nn.Module:
    """The module of ``model`` that ``precision`` and ``compile`` act on.

    Raises:
        ValueError: the model has none of :data:`FEATURE_EXTRACTORS`.
    """
    for name in FEATURE_EXTRACTORS:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"--precision and --compile act on a model's {' or '.join(FEATURE_EXTRACTORS)}, which "
                     f"{type(model).__name__} does not have: run it without them")


def run_under_autocast(module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Make ``module``'s forward run under ``torch.autocast(device_type, dtype)`` and return its floating
    outputs as float32, so what follows it runs in float32. Bound as a method: a deep copy rebinds it."""
    module.forward = types.MethodType(functools.partial(_autocast_forward, type(module).forward, device_type, dtype),
                                      module)


def _autocast_forward(forward: Any, device_type: str, dtype: torch.dtype, module: nn.Module, *args: Any,
                      **kwargs: Any) -> Any:
    with torch.autocast(device_type, dtype=dtype):
        out = forward(module, *args, **kwargs)
    return _as_float32(out)


def _as_float32(out: Any) -> Any:
    """``out`` (tensors in dicts, lists and tuples) with every floating tensor as float32."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return type(out)((k, _as_float32(v)) for k, v in out.items())
    if isinstance(out, (list, tuple)):
        return type(out)(_as_float32(v) for v in out)
    return out
