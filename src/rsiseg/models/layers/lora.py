"""Low-rank adapters (LoRA, Hu et al., ICLR 2022) for frozen linear layers.

A wrapped layer computes ``base(x) + (dropout(x) @ A^T @ B^T) * alpha / r``: the base weights stay
frozen and only ``A`` ``[r, in]`` and ``B`` ``[out, r]`` are trained. ``B`` starts at zero, so a freshly
wrapped model computes exactly what the pretrained one did.

SAM's image encoder fuses query, key and value into one ``attn.qkv`` ``nn.Linear(D, 3 D)``. The LoRA
fine-tunings of SAM (SAMed, PointSAM) adapt the query and value projections only, so ``parts="qv"``
gives the q and v thirds of the fused output their own adapter pair and leaves k untouched.

Checkpoints: wrapping renames the base layer's parameters (``...attn.qkv.weight`` becomes
``...attn.qkv.base.weight``) and adds ``...attn.qkv.lora_a`` / ``lora_b``. An official SAM checkpoint
must therefore be loaded *before* :func:`add_lora` is called; a checkpoint saved after wrapping
loads into a model wrapped the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

# Which thirds of a fused qkv output each ``parts`` value adapts (0 = q, 1 = k, 2 = v).
_FUSED_PARTS = {"qv": (0, 2), "qkv": (0, 1, 2)}


def _is_attention_qkv(name: str) -> bool:
    return name.endswith("attn.qkv")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Inputs ``x`` ``[..., in]`` (any leading dims, e.g. SAM's ``[B, H, W, D]``), output ``[..., out]``,
    same dtype as the base layer.

    Parameters (one adapter pair per adapted part P):
        ``lora_a``: ``[P, r, in]``, Kaiming-uniform as in the LoRA reference code.
        ``lora_b``: ``[P, out_part, r]``, zeros; ``out_part = out / 3`` for a fused qkv, else ``out``.

    Args:
        base: the linear layer to adapt. Its weight and bias are frozen (``requires_grad=False``).
        rank: r >= 1.
        alpha: scaling numerator; the update is multiplied by ``alpha / r``. None means ``alpha = r``
            (scale 1).
        parts: ``"qv"`` or ``"qkv"`` for a fused qkv projection (``out`` divisible by 3: which thirds
            get an adapter), or None to adapt the whole output of a plain linear layer.
        dropout: dropout probability on the adapter's input only (the base path sees ``x`` unchanged).
    """

    def __init__(
        self, base: nn.Linear, rank: int, *, alpha: float | None = None, parts: str | None = "qv", dropout: float = 0.0
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        out_features, in_features = base.out_features, base.in_features
        if parts is None:
            out_part, part_index = out_features, (0,)
        elif parts in _FUSED_PARTS:
            if out_features % 3 != 0:
                raise ValueError(
                    f"parts={parts!r} needs a fused qkv layer (out divisible by 3), got out={out_features}"
                )
            out_part, part_index = out_features // 3, _FUSED_PARTS[parts]
        else:
            raise ValueError(f"LoRA parts must be one of {sorted(_FUSED_PARTS)} or None, got {parts!r}")
        self.base = base
        base.requires_grad_(False)
        self.rank = rank
        self.parts = parts
        self.scale = (rank if alpha is None else alpha) / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(len(part_index), rank, in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(len(part_index), out_part, rank, **factory))
        # A buffer so that it follows .to(device); not persistent: it is derived from ``parts``.
        self.register_buffer("part_index", torch.tensor(part_index, dtype=torch.int64, device=factory["device"]), False)
        self.reset_lora()

    def reset_lora(self) -> None:
        """Re-initialise the adapters: ``A`` Kaiming-uniform per part, ``B`` zero (update = 0)."""
        with torch.no_grad():
            for a in self.lora_a:
                # a=sqrt(5) is what nn.Linear and the LoRA reference implementation use.
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_b.zero_()

    def delta(self, x: Tensor) -> Tensor:
        """The low-rank update alone: ``x`` ``[..., in]`` -> ``[..., P, out_part]`` (already scaled)."""
        hidden = torch.einsum("...i,pri->...pr", self.dropout(x), self.lora_a)
        return torch.einsum("...pr,por->...po", hidden, self.lora_b) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[..., in]`` -> ``base(x) + update`` ``[..., out]``."""
        out = self.base(x)
        delta = self.delta(x).to(out.dtype)
        if self.parts is None:
            return out + delta.squeeze(-2)
        # View the fused output as [..., 3, D] and add each adapter to its own third.
        fused = out.unflatten(-1, (3, out.shape[-1] // 3))
        return fused.index_add(-2, self.part_index, delta).flatten(-2)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, parts={self.parts!r}"


def add_lora(
    module: nn.Module,
    rank: int,
    alpha: float | None = None,
    parts: str | None = "qv",
    name_filter: Callable[[str], bool] = _is_attention_qkv,
    *,
    dropout: float = 0.0,
) -> int:
    """Replace, in place, every ``nn.Linear`` in ``module`` whose qualified name passes ``name_filter``.

    Each match becomes a :class:`LoRALinear` around the original layer, whose weights are frozen.
    Parameters of other layers are left as they are: freezing the rest of the encoder is the
    caller's decision. Load pretrained weights before calling this (see the module docstring).

    Args:
        module: the model or sub-model to adapt, e.g. a SAM ``ImageEncoderViT``.
        rank: adapter rank r >= 1.
        alpha: scaling numerator (None: ``alpha = r``).
        parts: see :class:`LoRALinear` (``"qv"`` for SAM's fused ``attn.qkv``; None for plain layers).
        name_filter: called with each sub-module's qualified name relative to ``module``
            (e.g. ``"blocks.0.attn.qkv"``); the default matches SAM's attention qkv projections.
        dropout: dropout on the adapters' input.

    Returns:
        The number of layers wrapped (>= 1).

    Raises:
        ValueError: if ``rank < 1`` or no ``nn.Linear`` matched ``name_filter``.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    # Collect first: replacing while iterating named_modules() would visit the new wrappers too.
    # The base layer inside an existing wrapper is skipped, so a second call never wraps twice.
    wrapped = {id(m.base) for m in module.modules() if isinstance(m, LoRALinear)}
    matches = [
        (name, child)
        for name, child in module.named_modules()
        if name and isinstance(child, nn.Linear) and id(child) not in wrapped and name_filter(name)
    ]
    if not matches:
        filter_name = getattr(name_filter, "__name__", repr(name_filter))
        raise ValueError(
            f"add_lora found no nn.Linear in {type(module).__name__} whose name passes {filter_name} "
            f"(default: names ending in 'attn.qkv'); is it already wrapped, or is the filter wrong?"
        )
    for name, child in matches:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, LoRALinear(child, rank, alpha=alpha, parts=parts, dropout=dropout))
    return len(matches)


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (``lora_a``, ``lora_b``) of every :class:`LoRALinear` in ``module``."""
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]


def trainable_parameters(module: nn.Module) -> int:
    """Number of scalar parameters in ``module`` with ``requires_grad=True``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
