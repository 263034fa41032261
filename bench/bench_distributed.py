"""Distributed training overhead on this machine: 2 gloo processes against 1 process, the tiny config.

Usage: .venv/bin/python bench/bench_distributed.py [--config configs/maskrcnn_tiny.yaml] [--steps 20]
           [--warmup 3] [--out /tmp/bench_distributed.json]

Run the config's ``# data:`` command first. Each setting trains ``--steps`` timed steps (after
``--warmup``) of the config's model on its data, with the trainer's own pieces (the rank's share of each
global batch from ``EpochBatchSampler``, DistributedDataParallel, the loss average, the optimizer):

* ``1 process``: ``torch.set_num_threads(2)``, batch ``train.batch_size`` (the global batch);
* ``2 processes``: gloo, one thread each, batch ``train.batch_size / 2`` per process (the same global batch),
  timed once as DDP runs it and once inside ``no_sync()`` (no gradient all-reduce): the difference is the
  all-reduce's share of the step.

The CPU has 2 cores, so this measures correctness overhead, not scaling. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def timed_steps(net, model, optimizer, loader_iter, steps: int, sync: bool) -> list[float]:
    times = []
    for _ in range(steps):
        images, targets = next(loader_iter)
        start = time.perf_counter()
        context = net.no_sync() if (not sync and hasattr(net, "no_sync")) else _null()
        with context:
            losses = net(images, targets)
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def worker(rank: int, world: int, port: int, config: str, steps: int, warmup: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(2 if world == 1 else 1)
    from torch.utils.data import DataLoader

    from rsiseg.config import load_config
    from rsiseg.data.loader import collate
    from rsiseg.engine.distributed import init_distributed, shutdown_process_group, wrap_model
    from rsiseg.engine.optim import build_optimizer
    from rsiseg.engine.sampler import EpochBatchSampler
    from rsiseg.models.registry import build_model
    from rsiseg.tasks import get_task

    cfg = load_config(config)
    ctx = init_distributed("cpu", 300.0)
    per_rank = max(1, cfg.train.batch_size // world)
    torch.manual_seed(0)
    train, _ = get_task(cfg.task).build_datasets(cfg)
    model, net = wrap_model(build_model(cfg.model), ctx, torch.device("cpu"), sync_bn=False)
    optimizer = build_optimizer(model, cfg.train)
    net.train()

    def batches():
        epoch = 0
        while True:
            sampler = EpochBatchSampler(len(train), per_rank, 0, ctx.rank, ctx.world_size)
            sampler.set_epoch(epoch)
            yield from DataLoader(train, batch_sampler=sampler, collate_fn=collate)
            epoch += 1

    stream = batches()
    timed_steps(net, model, optimizer, stream, warmup, sync=True)
    with_sync = timed_steps(net, model, optimizer, stream, steps, sync=True)
    without = timed_steps(net, model, optimizer, stream, steps, sync=False) if world > 1 else with_sync
    if ctx.is_main:
        Path(out).write_text(json.dumps({
            "world": world, "batch_per_process": per_rank, "global_batch": per_rank * world,
            "step_s_median": statistics.median(with_sync), "step_s_no_sync_median": statistics.median(without),
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }))
    shutdown_process_group()


def run(world: int, args: argparse.Namespace, out: Path) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    procs = [context.Process(target=worker, args=(r, world, port, args.config, args.steps, args.warmup, str(out)))
             for r in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/maskrcnn_tiny.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="/tmp/bench_distributed.json")
    args = parser.parse_args()
    report = {"config": args.config, "steps": args.steps, "runs": []}
    for world in (1, 2):
        row = run(world, args, Path(f"/tmp/bench_distributed_w{world}.json"))
        row["img_per_s"] = row["global_batch"] / row["step_s_median"]
        row["allreduce_share"] = max(0.0, 1 - row["step_s_no_sync_median"] / row["step_s_median"])
        report["runs"].append(row)
        print(json.dumps(row), flush=True)
    grad_bytes = 4 * report["runs"][0]["params"]
    report["allreduce_mb_per_step"] = grad_bytes / 1e6
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
