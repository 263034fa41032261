"""torchrun-like ranks spawned inside pytest: gloo on CPU, one thread each, on a free local port.

A rank's target is a module-level function ``target(rank, world, port, *args)`` (spawned processes
import it by name); it calls :func:`rank_environment` first and reports to the test through files.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

JOIN_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_environment(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives rank ``rank`` of ``world``, and one thread (the ranks share 2 cores)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def spawn_ranks(target: Callable[..., None], world: int, *args: object) -> list[int | None]:
    """Run ``target(rank, world, port, *args)`` in ``world`` spawned processes to the end; their exit codes.

    A rank still running after :data:`JOIN_TIMEOUT_S` is killed and fails the test as a hang.
    """
    context = mp.get_context("spawn")
    port = free_port()
    procs = [context.Process(target=target, args=(rank, world, port, *args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(JOIN_TIMEOUT_S)
    alive = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for rank in alive:
        procs[rank].kill()
    assert not alive, f"ranks {alive} still running after {JOIN_TIMEOUT_S} s: a hang"
    return [proc.exitcode for proc in procs]


def cli_rank(rank: int, world: int, port: int, argv: list[str], results: str) -> None:
    """``rsiseg ARGV`` as one torchrun rank; writes its exit code to ``results/rank{rank}.json``."""
    rank_environment(rank, world, port)
    from rsiseg.cli import main

    Path(results, f"rank{rank}.json").write_text(json.dumps({"code": main(argv)}))


def run_cli(world: int, argv: list[str], results: Path) -> list[int]:
    """``torchrun --nproc-per-node WORLD -m rsiseg ARGV``, spawned; each rank's exit code."""
    results.mkdir(parents=True, exist_ok=True)
    exits = spawn_ranks(cli_rank, world, argv, str(results))
    assert exits == [0] * world, f"rsiseg {' '.join(argv)}: the ranks' processes exited with {exits}"
    return [json.loads((results / f"rank{rank}.json").read_text())["code"] for rank in range(world)]
