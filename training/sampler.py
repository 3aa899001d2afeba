"""Which samples each process trains on, in an order fixed by (seed, epoch) so a run can resume mid-epoch.

Each epoch is a permutation of the dataset drawn from seed + epoch; it is cut into global batches of
batch_size x world samples (the remainder is dropped so every process takes the same number of steps)
and process r takes the r-th slice of each global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from turbo.errors import TurboError


class SamplerError(TurboError):
    """A dataset too small for the batch size and number of processes."""


@dataclass
class Position:
    """Where the next batch comes from: epoch and batch index within it."""

    epoch: int = 0
    batch: int = 0


class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices for one process; `position` says where the next pass starts.

    Use as a DataLoader's `batch_sampler` and build a fresh iterator per epoch (see `batches`).
    """

    def __init__(
        self, size: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True
    ) -> None:
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.per_epoch = size // (batch_size * world)
        if self.per_epoch == 0:
            raise SamplerError(
                f"the training split has {size} samples, fewer than one batch of {batch_size} per process "
                f"x {world} process(es); lower --batch-size"
            )
        self.position = Position()

    def __len__(self) -> int:
        return self.per_epoch - self.position.batch

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.position.epoch)
        step = self.batch_size * self.world
        for b in range(self.position.batch, self.per_epoch):
            start = b * step + self.rank * self.batch_size
            yield order[start : start + self.batch_size]


def batches(
    loader: torch.utils.data.DataLoader, sampler: ResumableBatchSampler
) -> Iterator[tuple[Position, dict]]:
    """Endless (position after this batch, batch) pairs, epoch after epoch, from sampler.position on.

    Calls the dataset's `set_epoch` (if any) before each epoch so seeded augmentations follow the epoch.
    """
    dataset = loader.dataset
    while True:
        pos = sampler.position
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(pos.epoch)
        index = pos.batch
        for batch in loader:
            index += 1
            after = Position(pos.epoch, index) if index < sampler.per_epoch else Position(pos.epoch + 1, 0)
            yield after, batch
        sampler.position = Position(pos.epoch + 1, 0)
