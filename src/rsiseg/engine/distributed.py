"""Distributed training on PyTorch's own engine: ``torchrun`` + DistributedDataParallel.

``torchrun --nproc-per-node N -m rsiseg train CONFIG`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and joins the process group
(NCCL when the run is on CUDA, gloo on CPU). Without ``WORLD_SIZE`` (or with 1) everything here is a
no-op on one process, so the trainer has one code path. rsiseg writes no launcher of its own.

What the trainer gets from :class:`Distributed`:

* ``rank``, ``world_size``, ``local_rank``, ``is_main`` (only rank 0 logs, writes TensorBoard, curves
  and checkpoints);
* :meth:`Distributed.agree` (any rank's flag, for skipping a non-finite batch on every rank together,
  so that no rank waits in a gradient all-reduce the others never enter);
* :meth:`Distributed.gather` (picklable objects from every rank, on every rank) and
  :meth:`Distributed.broadcast` (rank 0's object to every rank).

A rank that dies makes the collective the others are in fail: gloo reports the closed connection
at once, NCCL and every backend after ``train.dist_timeout`` seconds; the others then exit with an
error naming the rank and the step, and torchrun (``--max-restarts``) may start the group again, which
continues from the last checkpoint with ``rsiseg train --auto-resume``.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rsiseg.config import TrainConfig


class DistributedError(ConnectionError):
    """A collective failed: another rank died or stopped answering (an ``OSError``: the command line prints
    its message without a traceback)."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run; ``world_size`` 1 is the single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree(self, flag: bool, what: str = "flag") -> bool:
        """True on every rank when ``flag`` is True on any rank."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self._device())
        self._collective(lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX), what)
        return bool(value.item() > 0)

    def mean(self, values: dict[str, float], what: str = "mean") -> dict[str, float]:
        """Each value averaged over the ranks (the logged losses: those of the global batch)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=self._device())
        self._collective(lambda: dist.all_reduce(tensor), what)
        return dict(zip(values, (tensor / self.world_size).tolist()))

    def gather(self, obj: Any, what: str = "gather") -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank (``[obj]`` on one process)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(out, obj), what)
        return out

    def broadcast(self, obj: Any, what: str = "broadcast") -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        self._collective(lambda: dist.broadcast_object_list(box, src=0), what)
        return box[0]

    def main_first(self, call, what: str):
        """``call()`` on rank 0, then on the other ranks (one at a time against rank 0): for checks that touch files."""
        result = call() if self.is_main else None
        self.barrier(what)
        return result if self.is_main else call()

    def main_only(self, call, what: str) -> None:
        """``call()`` on rank 0 alone, the others waiting for it: for checks that remove files."""
        if self.is_main:
            call()
        self.barrier(what)

    def barrier(self, what: str = "barrier") -> None:
        if self.enabled:
            self._collective(dist.barrier, what)

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def failure(self, what: str, err: BaseException) -> DistributedError:
        """The error this rank stops with when a collective (``what``) failed with ``err``."""
        first = str(err).splitlines()[0] if str(err) else ""
        return DistributedError(
            f"rank {self.rank} of {self.world_size}: {what} failed: another process has died or stopped answering "
            f"({type(err).__name__}: {first}); restart the run with --resume to continue from the last checkpoint")

    def _collective(self, call, what: str) -> None:
        try:
            call()
        except RuntimeError as err:
            raise self.failure(what, err) from None


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed collective (a peer gone): gloo's and NCCL's errors, as DDP raises them."""
    return isinstance(err, dist.DistBackendError) or any(
        mark in str(err) for mark in ("gloo", "NCCL", "Connection closed", "Connection reset"))


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} from the environment do not fit (0 <= RANK < WORLD_SIZE)")
    return rank, world, local


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> Distributed:
    """Join the process group torchrun describes, or return the single-process :class:`Distributed`.

    Args:
        device: ``train.device``; ``cpu`` (or ``auto`` without CUDA) picks gloo, CUDA picks NCCL and
            binds this process to ``cuda:LOCAL_RANK``.
        timeout_s: how long a collective may wait for the others before it fails.
    """
    rank, world, local = world_from_env()
    if world == 1:
        return Distributed()
    on_cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if on_cuda else "gloo"
    if on_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, store=attempt_store(timeout), rank=rank, world_size=world, timeout=timeout)
    return Distributed(rank, world, local, backend)


def attempt_store(timeout: datetime.timedelta) -> dist.Store:
    """The ``env://`` rendezvous store, under a prefix of its own for each torchrun restart.

    torchrun's agent keeps one store for all attempts (``--max-restarts``), so a restarted group would
    find the last attempt's keys in it: a rank that gets there before its peer has written its new
    address reads the dead process's and fails to connect (torch 2.15, gloo). The prefix
    ``attempt_{TORCHELASTIC_RESTART_COUNT}`` gives each attempt empty keys.
    """
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    return dist.PrefixStore(f"rsiseg/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def gather_sorted(ctx: Distributed, items: list[Any], key, what: str = "gathering the results") -> list[Any]:
    """Every rank's ``items``, merged and stably sorted by ``key`` (one process: ``items`` unchanged).

    With ``key`` the position of an item's image, the merged list of a sharded prediction is the
    single-process list: each image's items come from one rank, in their order.
    """
    if not ctx.enabled:
        return items
    return sorted((item for part in ctx.gather(items, what) for item in part), key=key)


def rank_device_name(ctx: Distributed, name: str) -> str:
    """``train.device`` / ``--device`` for this rank: ``cuda:LOCAL_RANK`` on a CUDA run, else ``name``."""
    if ctx.enabled and name != "cpu" and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank}"
    return name


def shutdown_process_group() -> None:
    """Leave the process group, when this process joined one (the end of a torchrun run)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: Distributed, device: torch.device, sync_bn: bool) -> tuple[nn.Module, nn.Module]:
    """``(model, net)``: the model on its device, and what training calls: DDP around it when distributed.

    With ``sync_bn`` the batch norms become :class:`~torch.nn.SyncBatchNorm` first (statistics over the
    global batch). DDP runs with ``find_unused_parameters``: a batch without objects leaves a mask head,
    and the first stage of two-stage training the backbone, without gradients.
    """
    if ctx.enabled and sync_bn:
        if device.type != "cuda":
            raise ValueError("train.sync_bn: PyTorch's SyncBatchNorm runs on GPUs only; on CPU use model.norm gn "
                             "(no statistics across the batch) or frozen_bn")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if not ctx.enabled:
        return model, model
    device_ids = [device.index] if device.type == "cuda" else None
    return model, DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def scaled_train_config(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """``cfg`` with the lr of the global batch: times ``world_size`` with ``lr_scaling: linear`` (Goyal et al.,
    2017: ``batch_size`` is per process, so N processes train on N times the batch)."""
    if cfg.lr_scaling == "none" or world_size == 1:
        return cfg
    return replace(cfg, lr=cfg.lr * world_size)


def resume_position(epoch: int, iteration: int, num_items: int, batch_size: int, saved_world: int,
                    world: int) -> int:
    """The iteration at which ``world`` processes continue a checkpoint ``saved_world`` processes wrote.

    An iteration is one global batch of ``batch_size x processes``: the run continues in the same epoch
    after the same number of its images (rounded up to whole global batches).
    """
    saved_per_epoch = math.ceil(num_items / (batch_size * saved_world))
    per_epoch = math.ceil(num_items / (batch_size * world))
    images_done = (iteration - epoch * saved_per_epoch) * batch_size * saved_world
    return epoch * per_epoch + min(per_epoch, math.ceil(images_done / (batch_size * world)))


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    path = None

    def write(self, *args: Any, **kwargs: Any) -> None:
        return None

    def close(self) -> None:
        return None
