"""The training order: shuffled batches that are a pure function of (seed, epoch).

The batch sampler yields ``(index, epoch)`` keys rather than bare indices, so that augmentation
draws follow the epoch even inside persistent loader workers, which never see state changed in
the main process. Resuming mid-epoch skips the batches already done.
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
        batch_size: items per batch (the last batch may be smaller).
        seed: the experiment seed.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int) -> None:
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate epoch ``epoch`` next, leaving out its first ``skip`` batches (already trained)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in epoch_batches(self.num_items, self.batch_size, self.seed, self.epoch)[self.skip:]:
            yield [(index, self.epoch) for index in batch]

    def __len__(self) -> int:
        return max(0, -(-self.num_items // self.batch_size) - self.skip)
