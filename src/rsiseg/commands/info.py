"""``rsiseg info``: parameters by component, model size, FLOPs, speed and peak memory of a config's model.

Builds the model a config describes (or, with --checkpoint, the one stored in a checkpoint, with its
weights), without pretrained or backbone weight files, and prints a Markdown report: parameters and
GFLOPs per component (backbone, cbam, fpn, rpn, box head, box predictor, mask head for Mask R-CNN),
size at FP32 / FP16 / INT8, then FPS, median latency and peak memory at batch 1 on the device.

FLOPs and speed are for one seeded noise image of --input-size given to the model. Detectors resize
every image themselves (model.min_size / max_size), so the default input is min_size x min_size, the
size their backbone sees; a semantic model with data.image_size set defaults to that square. The RoI
heads' share of a detector's FLOPs depends on how many detections survive, which the report states.
FLOPs count matmuls and convolutions, a multiply-add as 2 (torch's FlopCounterMode).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rsiseg.commands.argtypes import int_in_range
from rsiseg.config import ExperimentConfig, apply_overrides, load_config
from rsiseg.fileio import atomic_write


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="experiment YAML (leave out with --checkpoint)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. model.fpn_channels=128")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="use the config stored in this .pth (and its weights) instead of a YAML")
    parser.add_argument("--input-size", nargs=2, type=int_in_range(1), metavar=("H", "W"),
                        help="size of the image given to the model (default: data.image_size for a semantic "
                        "config that sets it, else model.min_size square)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--fps-runs", type=int_in_range(1), default=20, metavar="N",
                        help="timed forward passes; the median gives latency and FPS (default 20)")
    parser.add_argument("--warmup", type=int_in_range(0), default=3, metavar="N", help="untimed passes first (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic image (default 0)")
    parser.add_argument("--no-speed", action="store_true", help="parameters, sizes and FLOPs only; no timing")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from rsiseg.evaluation.efficiency import measure_efficiency
    from rsiseg.inference.predictor import select_device, without_initial_weights
    from rsiseg.models.registry import build_model

    cfg, weights, source = _resolve_config(args)
    device = select_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here")
    model = build_model(without_initial_weights(cfg.model))
    if weights is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(f"{source}: its weights do not fit the model built from its config "
                             f"(check the overrides): {str(err).splitlines()[0]}") from None
    model.to(device)
    size = tuple(args.input_size) if args.input_size else default_input_size(cfg)
    if cfg.task == "prompted":
        model = one_point_each(model)
    report = measure_efficiency(
        model, in_channels=cfg.model.in_channels, input_size=size, name=cfg.model.name, speed=not args.no_speed,
        runs=args.fps_runs, warmup=args.warmup, seed=args.seed, notes=_notes(cfg, size, source),
    )
    print(report.to_markdown())
    if args.json:
        text = json.dumps(report.to_dict(), indent=1)
        atomic_write(args.json, lambda handle: handle.write(text + "\n"))
        print(f"wrote {args.json}")
    return 0


def one_point_each(model: Any) -> Any:
    """A prompted model measured as it answers one point at each image's centre: the image encoder, which
    runs once per image whatever the prompt count, and one prompt's decoding (see bench/bench_sam_latency.py
    for the cost of more prompts)."""
    import torch
    from torch import nn

    class OnePoint(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: list[torch.Tensor]) -> Any:
            centres = [torch.tensor([[img.shape[-1] / 2, img.shape[-2] / 2]], device=img.device) for img in images]
            # inference_mode: a view of a trainable embedding made under no_grad would claim requires_grad
            # without a graph, which FLOP counting's module tracker refuses.
            with torch.inference_mode():
                return self.model(images, prompts=[{"points": c} for c in centres])

    return OnePoint()


def _resolve_config(args: argparse.Namespace) -> tuple[ExperimentConfig, dict[str, Any] | None, str]:
    """``(config, checkpoint weights or None, its source)`` from the config file or ``--checkpoint``."""
    overrides = list(args.overrides)
    if not args.checkpoint:
        if not args.config:
            raise ValueError("rsiseg info needs a CONFIG.yaml or --checkpoint PATH")
        return load_config(args.config, overrides), None, args.config
    if args.config:
        if "=" not in args.config:  # argparse gives the first override to `config` when no YAML is named
            raise ValueError(f"pass either a config ({args.config}) or --checkpoint {args.checkpoint}, not both")
        overrides.insert(0, args.config)
    from rsiseg.checkpoint import load_checkpoint
    from rsiseg.inference.predictor import stored_config

    state = load_checkpoint(args.checkpoint)
    cfg = stored_config(state, args.checkpoint)
    if overrides:
        cfg = apply_overrides(cfg, overrides, source=f"{args.checkpoint} (stored config) with overrides")
    return cfg, state["model"], args.checkpoint


def default_input_size(cfg: ExperimentConfig) -> tuple[int, int]:
    """``(H, W)`` the model computes on by default: ``data.image_size`` square for a semantic config that
    sets it (its loader resizes to that), else ``model.min_size`` square (what a detector resizes to)."""
    if cfg.task == "semantic" and cfg.data.image_size:
        return cfg.data.image_size, cfg.data.image_size
    return cfg.model.min_size, cfg.model.min_size


def _notes(cfg: ExperimentConfig, size: tuple[int, int], source: str) -> list[str]:
    notes = [f"model from {source}, built without pretrained or backbone weight files"]
    if cfg.task == "instance":
        from rsiseg.tools.anchor_boxes import ResizeRule

        height, width = size
        resized = ResizeRule(cfg.model.min_size, cfg.model.max_size).resized_shape(height, width)
        notes.append(f"the detector resizes this {height} x {width} image to {resized[0]} x "
                     f"{resized[1]} (model.min_size {cfg.model.min_size}, max_size "
                     f"{cfg.model.max_size}) before its backbone; its RoI-head FLOPs and time grow with the "
                     "detections kept")
    return notes
