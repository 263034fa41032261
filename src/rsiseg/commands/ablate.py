"""``rsiseg ablate``: a family's ablation table in one command (prompt modules; RELACT's additions).

``rsiseg ablate CONFIG --variants A,B,... --out DIR`` trains and evaluates each variant of a config under
the same schedule, data and seed; only the family's switches differ (:data:`ABLATIONS`):

* ``*_prompt`` models (Table II of Insight Any Instance): ``baseline``, ``lpm``, ``gpm``, ``parea``,
  ``lpm+gpm``, ``all``, varying ``model.prompt``'s ``lpm``, ``gpm`` and the area-loss weight;
* ``yolact_*`` models (the RELACT ablation): ``yolact``, ``+phase``, ``+sorting``, ``relact``, varying
  ``model.yolact.phase.enabled`` and ``model.yolact.sorting`` (``confidence`` or ``quality``).

Each run is a normal run folder ``DIR/<variant>``; a finished one is reused, and an interrupted one or one
that ``train.time_budget`` cut short of the schedule is resumed, so an ablation called again continues
exactly where it stopped (the table marks a row while its run is short). Every other option stays as the config sets it: the prompt family's
``baseline`` is the prompt model with its modules and area loss off, still trained with the config's
jittered ground-truth box prompts (``model.prompt.gt_prompt_ratio``), so each row differs from it by
its switches alone; ``gt_prompt_ratio=0`` as an override gives the plain R-CNN's training. The table
names that ratio. Writes ``DIR/ablation.md``
and ``DIR/ablation.json``: box AP/AP50/AP75, mask AP/AP50/AP75, mask APs/APm/APl, FPS (batch 1, the
first validation image, on this run's device), parameters and GFLOPs at that image's size.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from rsiseg.config import PromptConfig, apply_overrides, load_config
from rsiseg.evaluation.metrics import metric_value, percent
from rsiseg.fileio import atomic_write

log = logging.getLogger(__name__)


def _prompt_switches(lpm: bool, gpm: bool, parea: bool) -> Callable[[Any], list[str]]:
    def overrides(base: Any) -> list[str]:  # the area-loss weight is the config's (the default where it is off)
        weight = base.model.prompt.parea_weight or PromptConfig().parea_weight
        return [f"model.prompt.lpm={str(lpm).lower()}", f"model.prompt.gpm={str(gpm).lower()}",
                f"model.prompt.parea_weight={weight if parea else 0}"]

    return overrides


def _relact_switches(phase: bool, quality: bool) -> Callable[[Any], list[str]]:
    return lambda base: [f"model.yolact.phase.enabled={str(phase).lower()}",
                         f"model.yolact.sorting={'quality' if quality else 'confidence'}"]


class Ablation(NamedTuple):
    """A family's ablation: which models it applies to, the config section it varies, and each variant's
    overrides as a function of the base config."""

    applies: Callable[[str], bool]
    section: str
    variants: dict[str, Callable[[Any], list[str]]]


ABLATIONS: dict[str, Ablation] = {
    "prompt": Ablation(lambda name: name.endswith("_prompt"), "model.prompt", {
        "baseline": _prompt_switches(False, False, False),
        "lpm": _prompt_switches(True, False, False),
        "gpm": _prompt_switches(False, True, False),
        "parea": _prompt_switches(False, False, True),
        "lpm+gpm": _prompt_switches(True, True, False),
        "all": _prompt_switches(True, True, True),
    }),
    "relact": Ablation(lambda name: name.startswith("yolact_"), "model.yolact", {
        "yolact": _relact_switches(False, False),
        "+phase": _relact_switches(True, False),
        "+sorting": _relact_switches(False, True),
        "relact": _relact_switches(True, True),
    }),
}
COLUMNS = [("box AP", "bbox/AP"), ("AP50", "bbox/AP50"), ("AP75", "bbox/AP75"),
           ("mask AP", "segm/AP"), ("AP50", "segm/AP50"), ("AP75", "segm/AP75"),
           ("APs", "segm/APs"), ("APm", "segm/APm"), ("APl", "segm/APl")]


def ablation_for(model_name: str, config: str) -> Ablation:
    """The ablation of ``model_name``'s family.

    Raises:
        ValueError: no family's switches apply to the model.
    """
    for ablation in ABLATIONS.values():
        if ablation.applies(model_name):
            return ablation
    sections = ", ".join(a.section for a in ABLATIONS.values())
    raise ValueError(f"rsiseg ablate varies {sections}: {config} uses model.name {model_name!r}, which has no "
                     "ablation switches (use a *_prompt or a yolact_* model)")


def variant_list(text: str) -> list[str]:
    """``a,b,...`` as a list of distinct names (argparse type); checked against the family in :func:`run`."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    known = {name for ablation in ABLATIONS.values() for name in ablation.variants}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; "
                                         + "; ".join(f"{key}: {', '.join(a.variants)}" for key, a in ABLATIONS.items()))
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a *_prompt or yolact_* experiment YAML (its family's switches are varied)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides for every run")
    parser.add_argument("--variants", type=variant_list, default=None,
                        help="comma-separated; prompt: " + ", ".join(ABLATIONS["prompt"].variants) + "; relact: "
                        + ", ".join(ABLATIONS["relact"].variants) + " (default: all of the family's)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder of the runs and the table")
    parser.add_argument("--speed-runs", type=int, default=10, help="timed forwards per variant for FPS (default 10)")
    parser.add_argument("--device", default="auto", help="device of the FPS measurement: auto | cpu | cuda")


def variant_config(base: Any, ablation: Ablation, name: str, out: Path) -> Any:
    """``base`` with the variant's switches and its run folder ``out / name``."""
    overrides = [*ablation.variants[name](base), f"train.output_dir={out / name}"]
    return apply_overrides(base, overrides, source=f"ablation variant {name}")


def run(args: argparse.Namespace) -> int:
    from rsiseg.commands.sweep import train_or_reuse

    base = load_config(args.config, args.overrides)
    ablation = ablation_for(base.model.name, args.config)
    names = args.variants or list(ablation.variants)
    foreign = [n for n in names if n not in ablation.variants]
    if foreign:
        raise ValueError(f"variant(s) {', '.join(foreign)} are not {ablation.section} variants; "
                         f"choose from {', '.join(ablation.variants)}")
    if not base.data.val_ann:
        raise ValueError(f"{args.config}: data.val_ann is not set; every variant is evaluated (and timed) on it")
    out = Path(args.out)
    configs = {name: variant_config(base, ablation, name, out) for name in names}  # every variant checked first
    rows = []
    for name, cfg in configs.items():
        try:
            metrics, extent = train_or_reuse(cfg, f"variant {name}", progress=not args.quiet)
        except KeyboardInterrupt as err:  # finished variants are kept; the interrupted one resumes next time
            print(f"rsiseg ablate: {str(err) or 'interrupted'}", file=sys.stderr)
            return 130
        rows.append({"variant": name, "run": cfg.train.output_dir, "iterations": extent,
                     **{key: metric_value(metrics, key) for _, key in COLUMNS},
                     **speed_and_size(Path(cfg.train.output_dir) / "last.pth", args.device, args.speed_runs)})
    held = f"model.prompt.gt_prompt_ratio {base.model.prompt.gt_prompt_ratio:g} in every variant" \
        if ablation.section == "model.prompt" else ""
    write_ablation(out, args.config, rows, held)
    print((out / "ablation.md").read_text())
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.json'}")
    return 0


def speed_and_size(checkpoint: Path, device: str, runs: int) -> dict[str, Any]:
    """``fps`` (batch 1 on the first validation image), ``params``, ``gflops`` (that image) and the
    ``device`` of a run's model."""
    from rsiseg.data.coco import CocoInstanceDataset
    from rsiseg.evaluation.efficiency import count_flops, describe_device, measure_speed
    from rsiseg.inference.predictor import load_model

    loaded = load_model(checkpoint, device)
    data = loaded.config.data
    image = CocoInstanceDataset(data.val_ann, data.val_images or data.train_images,
                                in_channels=loaded.config.model.in_channels, load_targets=False)[0][0]
    speed = measure_speed(loaded.model, [image.to(loaded.device)], warmup=2, runs=runs)
    return {"fps": speed.fps, "params": sum(p.numel() for p in loaded.model.parameters()),
            "gflops": count_flops(loaded.model, [image.to(loaded.device)]).total / 1e9,
            "device": describe_device(loaded.device), "image_size": list(image.shape[-2:])}


def write_ablation(out: Path, config: str, rows: list[dict[str, Any]], held: str = "") -> None:
    """``ablation.json`` and the Markdown table ``ablation.md`` (the papers' layout) of one row per variant;
    ``held`` names a setting every variant shares that the reader must know (it ends the table's note).
    A variant that the time budget stopped short of the schedule is marked with where it stopped."""
    from rsiseg.commands.sweep import cut_short

    record = {"config": str(config), "runs": rows, **({"held": held} if held else {})}
    atomic_write(out / "ablation.json", lambda fh: fh.write(json.dumps(record, indent=1)))
    header = "| variant | " + " | ".join(label for label, _ in COLUMNS) + " | FPS | params (M) | GFLOPs |"
    lines = [header, "|---" * (len(COLUMNS) + 4) + "|"]
    for row in rows:
        cells = [percent(row[key]) for _, key in COLUMNS] + [f"{row['fps']:.2f}", f"{row['params'] / 1e6:.2f}",
                                                             f"{row['gflops']:.2f}"]
        lines.append(f"| {row['variant']}{cut_short(row['iterations'])} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Config `{config}`; FPS at batch 1 on {rows[0]['device']} and GFLOPs of a {rows[0]['image_size'][1]}"
                 f"x{rows[0]['image_size'][0]} validation image" + (f"; {held}." if held else ".") if rows else "")
    atomic_write(out / "ablation.md", lambda fh: fh.write("\n".join(lines) + "\n"))
