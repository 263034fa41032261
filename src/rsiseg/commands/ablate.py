"""``rsiseg ablate``: the prompt modules' ablation (Table II of Insight Any Instance) in one command.

``rsiseg ablate CONFIG --variants baseline,lpm,gpm,parea,all --out DIR`` trains and evaluates each
variant of a ``*_prompt`` config under the same schedule, data and seed; only the switches of
``model.prompt`` differ (:data:`VARIANTS`). Each run is a normal run folder ``DIR/<variant>``; a
finished one is reused, so an interrupted ablation continues where it stopped. Every other prompt
option (``gt_prompt_ratio``, ``fuse``, ...) stays as the config sets it. Writes ``DIR/ablation.md``
and ``DIR/ablation.json``: box AP/AP50/AP75, mask AP/AP50/AP75, mask APs/APm/APl, FPS (batch 1,
the first validation image, on this run's device) and parameters.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from rsiseg.config import PromptConfig, apply_overrides, load_config
from rsiseg.evaluation.metrics import metric_value, percent
from rsiseg.fileio import atomic_write

log = logging.getLogger(__name__)

# Each variant's switches: (lpm, gpm, proposals' area loss).
VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "baseline": (False, False, False),
    "lpm": (True, False, False),
    "gpm": (False, True, False),
    "parea": (False, False, True),
    "lpm+gpm": (True, True, False),
    "all": (True, True, True),
}
COLUMNS = [("box AP", "bbox/AP"), ("AP50", "bbox/AP50"), ("AP75", "bbox/AP75"),
           ("mask AP", "segm/AP"), ("AP50", "segm/AP50"), ("AP75", "segm/AP75"),
           ("APs", "segm/APs"), ("APm", "segm/APm"), ("APl", "segm/APl")]


def variant_list(text: str) -> list[str]:
    """``baseline,lpm,...`` as a list, each a key of :data:`VARIANTS` (argparse type)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a *_prompt experiment YAML (its model.prompt section is varied)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides for every run")
    parser.add_argument("--variants", type=variant_list, default=list(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all of them)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder of the runs and the table")
    parser.add_argument("--speed-runs", type=int, default=10, help="timed forwards per variant for FPS (default 10)")
    parser.add_argument("--device", default="auto", help="device of the FPS measurement: auto | cpu | cuda")


def variant_config(base: Any, name: str, out: Path) -> Any:
    """``base`` with the variant's switches and its run folder; the area-loss weight is the config's (the
    default weight where the config has it off)."""
    lpm, gpm, parea = VARIANTS[name]
    weight = base.model.prompt.parea_weight or PromptConfig().parea_weight
    overrides = [f"model.prompt.lpm={str(lpm).lower()}", f"model.prompt.gpm={str(gpm).lower()}",
                 f"model.prompt.parea_weight={weight if parea else 0}", f"train.output_dir={out / name}"]
    return apply_overrides(base, overrides, source=f"ablation variant {name}")


def run(args: argparse.Namespace) -> int:
    from rsiseg.commands.sweep import train_or_reuse

    base = load_config(args.config, args.overrides)
    if base.model.name not in prompt_models():
        raise ValueError(f"rsiseg ablate varies model.prompt: {args.config} uses model.name {base.model.name!r}, "
                         f"not one of {', '.join(sorted(prompt_models()))}")
    out = Path(args.out)
    configs = {name: variant_config(base, name, out) for name in args.variants}  # every variant checked first
    rows = []
    for name, cfg in configs.items():
        try:
            metrics = train_or_reuse(cfg, f"variant {name}", progress=not args.quiet)
        except KeyboardInterrupt as err:  # finished variants are kept; the interrupted one resumes next time
            print(f"rsiseg ablate: {str(err) or 'interrupted'}", file=sys.stderr)
            return 130
        rows.append({"variant": name, "run": cfg.train.output_dir,
                     **{key: metric_value(metrics, key) for _, key in COLUMNS},
                     **speed_and_size(Path(cfg.train.output_dir) / "last.pth", args.device, args.speed_runs)})
    write_ablation(out, args.config, rows)
    print((out / "ablation.md").read_text())
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.json'}")
    return 0


def prompt_models() -> list[str]:
    from rsiseg.models.registry import MODELS

    return [name for name in MODELS if name.endswith("_prompt")]


def speed_and_size(checkpoint: Path, device: str, runs: int) -> dict[str, Any]:
    """``fps`` (batch 1 on the first validation image), ``params`` and the ``device`` of a run's model."""
    from rsiseg.data.coco import CocoInstanceDataset
    from rsiseg.evaluation.efficiency import describe_device, measure_speed
    from rsiseg.inference.predictor import load_model

    loaded = load_model(checkpoint, device)
    data = loaded.config.data
    image = CocoInstanceDataset(data.val_ann, data.val_images or data.train_images,
                                in_channels=loaded.config.model.in_channels, load_targets=False)[0][0]
    speed = measure_speed(loaded.model, [image.to(loaded.device)], warmup=2, runs=runs)
    return {"fps": speed.fps, "params": sum(p.numel() for p in loaded.model.parameters()),
            "device": describe_device(loaded.device), "image_size": list(image.shape[-2:])}


def write_ablation(out: Path, config: str, rows: list[dict[str, Any]]) -> None:
    """``ablation.json`` and the Markdown table ``ablation.md`` (Table II layout) of one row per variant."""
    atomic_write(out / "ablation.json", lambda fh: fh.write(json.dumps({"config": str(config), "runs": rows}, indent=1)))
    header = "| variant | " + " | ".join(label for label, _ in COLUMNS) + " | FPS | params (M) |"
    lines = [header, "|---" * (len(COLUMNS) + 3) + "|"]
    for row in rows:
        cells = [percent(row[key]) for _, key in COLUMNS] + [f"{row['fps']:.2f}", f"{row['params'] / 1e6:.2f}"]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Config `{config}`; FPS at batch 1 on {rows[0]['device']}, a {rows[0]['image_size'][1]}x"
                 f"{rows[0]['image_size'][0]} validation image." if rows else "")
    atomic_write(out / "ablation.md", lambda fh: fh.write("\n".join(lines) + "\n"))
