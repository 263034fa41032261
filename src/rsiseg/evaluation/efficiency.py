"""Efficiency figures shared by every model family: parameters by component, size, FLOPs, speed, memory.

Every ablation table takes its Params / FLOPs / FPS columns from here, so the conventions are fixed once:

- **Parameters** are counted once each (shared tensors once), split into components (see
  :func:`parameter_breakdown`); the rows always sum to ``sum(p.numel() for p in model.parameters())``.
- **Size** in MB, with 1 MB = 2**20 bytes as in torchvision's weight tables (see :func:`model_size_mb`).
- **FLOPs** from :class:`torch.utils.flop_counter.FlopCounterMode`: one eval forward at batch 1. It counts
  matrix multiplications and convolutions only, a multiply-add as 2 FLOPs (a ``Conv2d`` is
  ``2 * Cin/groups * k_h * k_w * Cout * H_out * W_out``, a ``Linear`` ``2 * in * out`` per row); biases,
  normalisation, activations, pooling, interpolation, FFTs, RoIAlign and NMS are not counted.
  GFLOPs = FLOPs / 1e9. By component, each FLOP counts to the innermost module running it, then to
  the row holding that module (see :func:`flops_by_component`).
- **Speed** at batch 1 on the model's device: warmup runs, then timed runs; the median latency and
  FPS = 1000 / median latency (ms).

Models take a list of float ``[C, H, W]`` images in [0, 1]. "At input size H x W" means one image of
that size is given to the model: a detector resizes it itself (its ``min_size`` / ``max_size``), so
its backbone may run on another size. A detector's RoI-head FLOPs and time also grow with the number
of proposals and detections that survive, which depends on the image and the weights: the image is
seeded uniform noise and the report states the seed and the detections kept.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils.flop_counter import FlopCounterMode

from rsiseg.evaluation.component_layouts import CBAM_ROW, get_path, layout_rows
from rsiseg.models.layers.cbam import CBAM

OTHER_ROW = "other"
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1}
MB = 2**20


class ComponentCount(NamedTuple):
    """One row of the breakdown: parameter counts (elements) and, once measured, forward FLOPs."""

    name: str
    params: int
    trainable: int
    flops: int | None = None


def cbam_modules(model: nn.Module) -> dict[str, CBAM]:
    """The outermost :class:`CBAM` blocks anywhere in ``model`` by path (``""`` when it is one)."""
    found: dict[str, CBAM] = {}
    for path, module in model.named_modules():
        if isinstance(module, CBAM) and not any(_is_under(path, outer) for outer in found):
            found[path] = module
    return found


def _is_under(path: str, outer: str) -> bool:
    return outer == "" or path == outer or path.startswith(outer + ".")


def parameter_breakdown(model: nn.Module) -> list[ComponentCount]:
    """Parameters by component; the rows sum to the model's total (each shared tensor counted once).

    A model with a known layout (:data:`~rsiseg.evaluation.component_layouts.LAYOUTS`; Mask R-CNN:
    backbone, cbam, fpn, rpn, box head, box predictor, mask head, a cascade's stages summed into the box
    rows; the prompt models add ``prompt: LPM``, ``prompt: GPM`` and ``prompt: fusion``) gets those rows,
    every one shown even when zero, so tables of different variants line up. Any other model gets one
    row per top-level child, zero rows hidden. In both, every parameter inside a
    :class:`~rsiseg.models.layers.cbam.CBAM` block, wherever it sits, goes to the ``cbam`` row (hidden
    when zero in the fallback), and parameters no row covers go to ``other``
    (shown only when non-zero).

    Returns:
        :class:`ComponentCount` rows with ``flops`` None.
    """
    rows, fixed = layout_rows(model)
    taken: set[int] = set()
    cbam_count = _claim(list(cbam_modules(model).values()), taken)  # first: no other row may claim them
    out = []
    for name, paths in rows:
        if name == CBAM_ROW:
            total, trainable = cbam_count
        else:
            total, trainable = _claim([get_path(model, p) for p in paths], taken)
        if fixed or total:
            out.append(ComponentCount(name, total, trainable))
    total, trainable = _claim([model], taken)
    if total:
        out.append(ComponentCount(OTHER_ROW, total, trainable))
    return out


def _claim(modules: list[nn.Module | None], taken: set[int]) -> tuple[int, int]:
    """Count the parameters of ``modules`` not yet in ``taken`` (then add them): ``(total, trainable)``."""
    total = trainable = 0
    for module in modules:
        if module is None:
            continue
        for param in module.parameters():
            if id(param) in taken:
                continue
            taken.add(id(param))
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
    return total, trainable


def model_size_mb(model: nn.Module) -> dict[str, float]:
    """Size of the weights at FP32, FP16 and INT8, in MB (2**20 bytes).

    Rule: every floating-point parameter and buffer element (shared tensors once, non-persistent buffers
    included) takes 4, 2 or 1 bytes; integer and bool buffers (e.g. BatchNorm's ``num_batches_tracked``)
    keep their own width, as no precision change touches them. INT8 leaves out the few bytes of
    quantisation scales and zero points.

    Returns:
        ``{"fp32": MB, "fp16": MB, "int8": MB}``.
    """
    floating = fixed = 0
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if tensor.is_floating_point():
            floating += tensor.numel()
        else:
            fixed += tensor.numel() * tensor.element_size()
    return {name: (floating * width + fixed) / MB for name, width in BYTES_PER_ELEMENT.items()}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` and ``torch.no_grad()`` inside; the previous training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def synthetic_image(channels: int, height: int, width: int, seed: int = 0,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """A float32 ``[C, H, W]`` image of uniform noise in [0, 1), the same for a given seed on any machine."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(channels, height, width, generator=generator).to(device)


class FlopCount(NamedTuple):
    """FLOPs of one forward: ``total``; ``by_module`` maps a module path (``""`` the root) to the FLOPs
    while it ran, its callees included; ``outputs`` is what the model returned; ``own`` maps a module
    path to the FLOPs charged to it as the innermost module running (``""``: the root's own code), so
    ``own`` sums to ``total``."""

    total: int
    by_module: dict[str, int]
    outputs: Any
    own: dict[str, int]


def count_flops(model: nn.Module, *inputs: Any) -> FlopCount:
    """FLOPs of ``model(*inputs)`` in eval mode without gradients (conventions: see the module docstring)."""
    root = type(model).__name__
    with eval_mode(model), FlopCounterMode(display=False) as counter, _innermost_charges(model, counter) as own:
        outputs = model(*inputs)
    by_module = {}
    # FlopCounterMode names modules "<root class>.<attribute path>"; its "Global" entry is the total.
    for name, ops in counter.get_flop_counts().items():
        if name == root or name.startswith(root + "."):
            by_module[name[len(root) + 1:]] = sum(ops.values())
    return FlopCount(counter.get_total_flops(), by_module, outputs, own)


@contextlib.contextmanager
def _innermost_charges(model: nn.Module, counter: FlopCounterMode) -> Iterator[dict[str, int]]:
    """FLOPs by the path of the innermost of ``model``'s modules running when they were counted.

    By call, not by path: a module's FLOPs stay its own when another module's code calls it (the GPM's
    global tokens, computed once per batch from the model's ``forward``). Filled on exit.
    """
    paths = {id(module): path for path, module in model.named_modules()}
    own: dict[str, int] = {}
    stack: list[str] = []
    mark = 0

    def charge() -> None:  # what was counted since the last call goes to the module on top
        nonlocal mark
        total = counter.get_total_flops()
        if total != mark:
            key = stack[-1] if stack else ""
            own[key] = own.get(key, 0) + total - mark
            mark = total

    def enter(module: nn.Module, _inputs: Any) -> None:
        if id(module) in paths:
            charge()
            stack.append(paths[id(module)])

    def leave(module: nn.Module, _inputs: Any, _output: Any) -> None:
        if id(module) in paths and stack:
            charge()
            stack.pop()

    hooks = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]
    try:
        yield own
    finally:
        for hook in hooks:
            hook.remove()
        stack.clear()
        charge()


def flops_by_component(model: nn.Module, rows: list[ComponentCount], flops: FlopCount) -> list[ComponentCount]:
    """``rows`` of :func:`parameter_breakdown` with ``flops`` filled from the same module paths.

    Each FLOP goes to the innermost module running it (:attr:`FlopCount.own`), and from there to the row
    whose paths hold that module; FLOPs in a :class:`~rsiseg.models.layers.cbam.CBAM` block go to the
    ``cbam`` row, and FLOPs outside every row's modules (e.g. in the root's own ``forward``) to ``other``,
    so the rows sum to the total.
    """
    shown = {row.name for row in rows}
    layout = [(name, paths) for name, paths in layout_rows(model)[0] if name in shown and name != CBAM_ROW]
    cbam = list(cbam_modules(model))
    counted = dict.fromkeys(shown - {OTHER_ROW}, 0)
    rest = 0
    for path, count in flops.own.items():
        if any(_is_under(path, c) for c in cbam):
            row = CBAM_ROW
        else:
            row = next((name for name, paths in layout if any(_is_under(path, p) for p in paths)), OTHER_ROW)
        if row in counted:
            counted[row] += count
        else:
            rest += count
    out = [row._replace(flops=counted.get(row.name, rest)) for row in rows]
    if rest and all(row.name != OTHER_ROW for row in rows):
        out.append(ComponentCount(OTHER_ROW, 0, 0, rest))
    return out


@dataclass
class SpeedResult:
    """Batch-1 timing and peak memory on one device.

    ``peak_memory_kind`` says what ``peak_memory_bytes`` is: ``"CUDA max_memory_allocated"`` (tensors
    allocated during the runs, weights included) or ``"process peak RSS"`` on CPU (the whole process
    since it started: Python, torch's libraries and everything loaded before, not the model alone).
    """

    warmup: int
    runs: int
    latency_ms: list[float]
    peak_memory_bytes: int
    peak_memory_kind: str

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latency_ms)

    @property
    def fps(self) -> float:
        return 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")


def measure_speed(model: nn.Module, images: list[torch.Tensor], warmup: int = 3, runs: int = 20) -> SpeedResult:
    """Time ``model(images)`` in eval mode: ``warmup`` untimed runs, then ``runs`` timed ones.

    Runs on the device of ``images``; on CUDA every run is synchronised before the clock is read.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    device = images[0].device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    latency = []
    with eval_mode(model):
        for i in range(warmup + runs):
            start = time.perf_counter()
            model(images)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                latency.append((time.perf_counter() - start) * 1000.0)
    if cuda:
        return SpeedResult(warmup, runs, latency, torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated")
    # ru_maxrss is in KiB on Linux (bytes on macOS; this toolkit's servers are Linux).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return SpeedResult(warmup, runs, latency, peak, "process peak RSS")


def describe_device(device: torch.device) -> str:
    """``"cuda:0 (NVIDIA H100 ...)"`` or ``"cpu (2 threads)"``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def _detections(outputs: Any) -> int | None:
    """Detections the model kept for the first image, when it returns ``boxes`` (else None)."""
    if isinstance(outputs, (list, tuple)) and outputs and isinstance(outputs[0], dict) and "boxes" in outputs[0]:
        return int(len(outputs[0]["boxes"]))
    return None


@dataclass
class EfficiencyReport:
    """All efficiency figures of one model at one input size; JSON with :meth:`to_dict`, tables with
    :meth:`to_markdown`."""

    model: str
    in_channels: int
    input_size: tuple[int, int]  # (H, W) of the one image given to the model
    device: str
    components: list[ComponentCount]
    size_mb: dict[str, float]
    flops: int
    seed: int  # of the synthetic image
    detections: int | None  # kept by a detector for that image; None for models without boxes
    speed: SpeedResult | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(row.params for row in self.components)

    @property
    def trainable_params(self) -> int:
        return sum(row.trainable for row in self.components)

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able figures (counts in elements and FLOPs, sizes in MB, times in ms)."""
        speed = None
        if self.speed is not None:
            speed = {"warmup": self.speed.warmup, "runs": self.speed.runs, "latency_ms_median": self.speed.median_ms,
                     "fps": self.speed.fps, "latency_ms": self.speed.latency_ms,
                     "peak_memory_bytes": self.speed.peak_memory_bytes,
                     "peak_memory_kind": self.speed.peak_memory_kind}
        return {
            "model": self.model, "in_channels": self.in_channels, "input_size": list(self.input_size),
            "batch_size": 1, "device": self.device,
            "params": {"total": self.total_params, "trainable": self.trainable_params},
            "components": [row._asdict() for row in self.components],
            "size_mb": dict(self.size_mb), "flops": self.flops, "gflops": self.gflops,
            "flops_convention": "FlopCounterMode: matmuls and convolutions, a multiply-add = 2 FLOPs",
            "seed": self.seed, "detections": self.detections, "speed": speed, "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        """A component table (params and trainable in millions, GFLOPs), then a table of the other figures."""
        lines = [f"## Efficiency of {self.model}", "", "| component | params (M) | trainable (M) | GFLOPs |",
                 "|---|---:|---:|---:|"]
        for row in self.components:
            gflops = "" if row.flops is None else f"{row.flops / 1e9:.3f}"
            lines.append(f"| {row.name} | {row.params / 1e6:.3f} | {row.trainable / 1e6:.3f} | {gflops} |")
        lines.append(f"| **total** | **{self.total_params / 1e6:.3f}** | **{self.trainable_params / 1e6:.3f}** | "
                     f"**{self.gflops:.3f}** |")
        height, width = self.input_size
        flops_note = f"noise image, seed {self.seed}"
        if self.detections is not None:
            flops_note += f"; {self.detections} detections kept"
        size = " / ".join(f"{self.size_mb[k]:.1f}" for k in BYTES_PER_ELEMENT)
        lines += ["", "| figure | value |", "|---|---|",
                  f"| size FP32 / FP16 / INT8 (MB) | {size} |",
                  f"| GFLOPs | {self.gflops:.3f} ({flops_note}) |"]
        if self.speed is not None:
            lines += [f"| FPS | {self.speed.fps:.2f} |",
                      f"| latency (ms, median of {self.speed.runs} after {self.speed.warmup} warmup) | "
                      f"{self.speed.median_ms:.1f} |",
                      f"| peak memory ({self.speed.peak_memory_kind}) | {self.speed.peak_memory_bytes / MB:.0f} MB |"]
        lines += [f"| device | {self.device} |",
                  f"| input | 1 image of {self.in_channels} x {height} x {width} (C x H x W), batch 1 |"]
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def measure_efficiency(
    model: nn.Module, *, in_channels: int, input_size: tuple[int, int], name: str = "", speed: bool = True,
    runs: int = 20, warmup: int = 3, seed: int = 0, notes: list[str] | None = None,
) -> EfficiencyReport:
    """Every figure of ``model`` on the device its parameters are on.

    Args:
        model: takes a list of float ``[C, H, W]`` images in [0, 1].
        in_channels: C of the synthetic image.
        input_size: ``(H, W)`` of the image given to the model (a detector resizes it itself).
        name: shown in the report (default: the model's class name).
        speed: also time it (``warmup`` then ``runs`` forwards) and read the peak memory.
        seed: of the synthetic image used for FLOPs and timing.
        notes: lines appended to the report.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    image = synthetic_image(in_channels, *input_size, seed=seed, device=device)
    components = parameter_breakdown(model)
    flops = count_flops(model, [image])
    return EfficiencyReport(
        model=name or type(model).__name__, in_channels=in_channels, input_size=(int(input_size[0]), int(input_size[1])),
        device=describe_device(device), components=flops_by_component(model, components, flops),
        size_mb=model_size_mb(model), flops=flops.total, seed=seed, detections=_detections(flops.outputs),
        speed=measure_speed(model, [image], warmup, runs) if speed else None, notes=list(notes or []),
    )
