"""The training order: shuffled batches that are a pure function of (seed, epoch).

The batch sampler yields ``(index, epoch)`` keys rather than bare indices, so that augmentation
draws follow the epoch even inside persistent loader workers, which never see state changed in
the main process. Resuming mid-epoch skips the batches already done.

In a distributed run the epoch is cut into *global* batches of ``batch_size x world_size`` (the
same order as one process with that batch size) and each rank takes its contiguous share of every
global batch, so N processes see together exactly the batches one process would. A last global
batch that does not split evenly is filled up with the epoch's first items, so every rank gets the
same number of items (DistributedSampler does the same).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch, a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(num_items, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, num_items, batch_size)]


class EpochBatchSampler:
    """Batch sampler over ``num_items`` for a ``DataLoader``; call :meth:`set_epoch` before each epoch.

    Args:
        num_items: dataset length.
        batch_size: items per batch of this process (the last batch may be smaller).
        seed: the experiment seed.
        rank, world_size: this process's share of each global batch (see the module docstring).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate epoch ``epoch`` next, leaving out its first ``skip`` batches (already trained)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = epoch_batches(self.num_items, self.batch_size * self.world_size, self.seed, self.epoch)
        for batch in batches[self.skip:]:
            yield [(index, self.epoch) for index in self._share(batch, batches[0])]

    def _share(self, batch: list[int], first: list[int]) -> list[int]:
        if self.world_size == 1:
            return batch
        per_rank = -(-len(batch) // self.world_size)
        filled = batch + (first * self.world_size)[: per_rank * self.world_size - len(batch)]
        return filled[self.rank * per_rank: (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        return max(0, -(-self.num_items // (self.batch_size * self.world_size)) - self.skip)
