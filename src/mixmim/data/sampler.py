"""The order in which samples are drawn, as a pure function of (seed, epoch, position).

Nothing about the order is kept in memory between steps, so a run resumed at global step ``s``
on any number of processes draws exactly the samples the interrupted run would have drawn.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit augmentation seed for the sample at ``position`` of ``epoch``'s permutation."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return (x ^ (x >> 32)) & (2**63 - 1)


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    return num_samples // global_batch


class ResumableSampler(Sampler):
    """Yields ``(index, augmentation seed)`` for this rank's share of each global batch.

    Epoch ``e`` is a permutation of the data set seeded by (seed, e); it is cut into global batches
    (the last partial one dropped) and rank ``r`` of ``w`` takes the ``r``-th slice of each, in
    micro-batch order. ``start_step`` skips global batches already trained on.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if global_batch > num_samples:
            raise ValueError(f"batch size {global_batch} is larger than the data set ({num_samples} images)")
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} is not divisible by the world size {world_size}")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (steps_per_epoch(self.num_samples,
                                self.global_batch) - self.start_step) * (self.global_batch // self.world_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        local = self.global_batch // self.world_size
        for step in range(self.start_step, steps_per_epoch(self.num_samples, self.global_batch)):
            begin = step * self.global_batch + self.rank * local
            for position in range(begin, begin + local):
                yield order[position], sample_seed(self.seed, self.epoch, position)
