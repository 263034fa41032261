"""``rsiseg sweep``: train one config once per value of a key and tabulate the final metrics.

For example accuracy against annotation budget, with ``--key data.points.count --values 50 500 5000``.
Each run is a normal run directory ``OUT/<key>=<value>``; a run that finished (its
``metrics.json`` exists) is reused, and an interrupted one or one that ``train.time_budget`` cut short is
resumed, so a sweep called again continues where it stopped (a row is marked while its run is short). Writes
``OUT/sweep.json``, ``OUT/sweep.md`` and ``OUT/sweep.png`` (each metric against the value).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from rsiseg.config import ConfigError, apply_overrides, config_from_dict, load_config, to_dict
from rsiseg.evaluation.metrics import metric_value, percent
from rsiseg.fileio import atomic_write

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides for every run")
    parser.add_argument("--key", required=True, help="the dotted config key to vary, e.g. data.points.count")
    parser.add_argument("--values", required=True, nargs="+", help="its values (read as YAML: 100, 0.05, null)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder of the runs and the tables")


def run(args: argparse.Namespace) -> int:
    from rsiseg.tasks import get_task

    out = Path(args.out)
    configs = [(value, _run_config(args, value, out)) for value in args.values]  # every value checked first
    rows = []
    for value, cfg in configs:
        run_dir = Path(cfg.train.output_dir)
        metrics, extent = train_or_reuse(cfg, f"{args.key}={value}", progress=not args.quiet)
        names = get_task(cfg.task).metric_names(cfg)
        rows.append({"value": value, "run": str(run_dir), "iterations": extent,
                     **{n: metric_value(metrics, n) for n in names}})
    write_sweep(out, args.key, rows)
    print((out / "sweep.md").read_text())
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'} and {out / 'sweep.png'}")
    return 0


# Settings of when a run stops and what it logs, not of what it learns: a run is reused or continued
# whatever they were (``train.time_budget=null`` may finish a run that the budget cut).
RUN_ONLY_KEYS = ("train.time_budget", "train.checkpoint_interval", "train.log_interval")


def train_or_reuse(cfg: Any, name: str, progress: bool = True) -> tuple[dict[str, Any], list[int | None]]:
    """Train ``cfg`` into ``train.output_dir``, reusing a finished run there and continuing an unfinished one.

    Unfinished: interrupted (a ``last.pth`` but no ``metrics.json``) or stopped short of its schedule by
    ``train.time_budget``; it is resumed (``--resume``, exact), so calling this again finishes it, each call
    with the budget anew. A run whose ``last.pth`` predates the recorded schedule length counts as finished
    when it has ``metrics.json``, and then its ``time_budget`` must match (it may have been cut).

    Returns:
        The final metrics and ``[iterations trained, the schedule's iterations]`` (the second None for a
        checkpoint from before rsiseg recorded it, both for a finished run without ``last.pth``); a run still
        short of its schedule is logged as such.
    """
    from rsiseg.engine.trainer import Trainer

    run_dir = Path(cfg.train.output_dir)
    ended = (run_dir / "metrics.json").is_file()
    extent = trained_iterations(run_dir)
    if not ended and extent[0] is None:  # nothing to continue
        Trainer(cfg, overwrite=True, progress=progress).fit()
        extent = trained_iterations(run_dir)
    else:  # a finished run whose checkpoints were deleted is reused as it is
        check_same_config(cfg, run_dir, name, budget_matters=ended and extent[1] is None)
        if ended and not cut_short(extent):
            log.info("%s: finished run found in %s, reused", name, run_dir)
        else:
            log.info("%s: continuing the run in %s from iteration %d%s", name, run_dir, extent[0],
                     f" of {extent[1]}" if extent[1] is not None else "")
            Trainer(cfg, resume=True, progress=progress).fit()
            extent = trained_iterations(run_dir)
    if cut_short(extent):
        log.warning("%s: stopped at iteration %d of %d by train.time_budget; its row is marked so. Run the same "
                    "command again to continue it", name, *extent)
    return json.loads((run_dir / "metrics.json").read_text()), extent


def trained_iterations(run_dir: Path) -> list[int | None]:
    """``[iterations trained, the schedule's iterations]`` from ``run_dir/last.pth`` (None: not recorded,
    both None without ``last.pth``)."""
    from rsiseg.checkpoint import load_checkpoint

    if not (run_dir / "last.pth").is_file():
        return [None, None]
    state = load_checkpoint(run_dir / "last.pth")
    return [state["iteration"], state.get("total_iterations")]


def cut_short(extent: list[int | None]) -> str:
    """`` (stopped at iteration i of N)`` for a run short of its schedule, else ``""``: a table's row mark."""
    done, total = extent
    return f" (stopped at iteration {done} of {total})" if total is not None and done < total else ""


def check_same_config(cfg: Any, run_dir: Path, name: str, budget_matters: bool = False) -> None:
    """Refuse to reuse or continue a run whose stored ``config.yaml`` differs from ``cfg`` (a changed default,
    config or override would otherwise mix two settings in one table). :data:`RUN_ONLY_KEYS` are not
    compared, ``train.time_budget`` only when ``budget_matters``.

    A key that rsiseg added after the run was trained is absent from its stored config; it counts as the
    default the run had in effect, so the run is still reused when ``cfg`` keeps that default.

    Raises:
        ValueError: naming the first differing key and both values.
    """
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    try:  # through today's loader: later keys get their defaults; every stored key keeps its stored value
        stored = yaml.safe_load(yaml.safe_dump(to_dict(config_from_dict(stored, source=str(run_dir / "config.yaml")))))
    except ConfigError:  # a key since removed or a value since refused: compared as stored
        pass
    wanted = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))  # through YAML, as the run stored it
    for key in RUN_ONLY_KEYS:
        if budget_matters and key == "train.time_budget":
            continue
        section, field = key.split(".")
        for settings in (stored, wanted):
            settings.get(section, {}).pop(field, None)
    difference = _first_difference(stored, wanted)
    if difference is not None:
        key, old, new = difference
        raise ValueError(f"{name}: the run in {run_dir} was trained with {key}={old!r}, but this run asks "
                         f"for {new!r}; remove that folder to train it again, or choose another --out")


def _first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key whose value differs between two nested dicts, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


def _run_config(args: argparse.Namespace, value: str, out: Path):
    name = f"{args.key}={value}".replace("/", "_")
    return apply_overrides(load_config(args.config, args.overrides),
                           [f"{args.key}={value}", f"train.output_dir={out / name}"], source=f"sweep {name}")


def write_sweep(out: Path, key: str, rows: list[dict[str, Any]]) -> None:
    """``sweep.json``, a markdown table ``sweep.md`` and the plot ``sweep.png`` of ``rows`` (one per value)."""
    metrics = [k for k in rows[0] if k not in ("value", "run", "iterations")]
    atomic_write(out / "sweep.json", lambda fh: fh.write(json.dumps({"key": key, "runs": rows}, indent=1)))
    lines = [f"| {key} | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += [f"| {r['value']}{cut_short(r['iterations'])} | " + " | ".join(percent(r[m]) for m in metrics) + " |"
              for r in rows]
    atomic_write(out / "sweep.md", lambda fh: fh.write("\n".join(lines) + "\n"))
    _plot(out / "sweep.png", key, rows, metrics)


def _plot(path: Path, key: str, rows: list[dict[str, Any]], metrics: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [str(r["value"]) for r in rows]
    for metric in metrics:
        ax.plot(range(len(rows)), [r[metric] for r in rows], marker="o", label=metric)
    ax.set_xticks(range(len(rows)), labels)
    ax.set(xlabel=key, ylabel="value", ylim=(0, 1), title=f"final metrics against {key}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100), binary=True)
    plt.close(fig)
