"""Deterministic randomness for exact resume: every random choice of training is a pure function of
(seed, epoch, sample index) or (seed, global step, micro-batch, rank), never of a running RNG state.

A run interrupted anywhere and resumed from (epoch, step in epoch) therefore sees the same data
order, the same augmentations and the same corruptions as an uninterrupted run, whatever the
number of DataLoader workers.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 on each part), stable across runs and Python
    versions (unlike hash())."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state >> 1


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class EpochSampler:
    """Keys (index, sample_seed) for one epoch of one rank, in a shuffled order fixed by (seed, epoch).

    Each optimizer step consumes `images_per_step` = batch_size * accum_iter images per rank; the
    epoch has `steps` such steps (the remainder of the shuffled order is dropped, as drop_last).
    Rank r of `world_size` takes the r-th slice of every global step, so the images of one global
    step are the same whatever the number of ranks that share them. `start_step` skips the steps
    a resumed run has already done in this epoch. A DataLoader built once for a whole run keeps
    one sampler and moves it with `set_epoch` before iterating each epoch.
    """

    def __init__(self, num_images: int, images_per_step: int, seed: int, epoch: int,
                 rank: int = 0, world_size: int = 1, start_step: int = 0) -> None:
        global_per_step = images_per_step * world_size
        self.steps = num_images // global_per_step
        if self.steps == 0:
            raise ValueError(f"one optimizer step needs {global_per_step} images (batch size x accum_iter x "
                             f"processes) but the training set has {num_images}")
        self.num_images, self.images_per_step, self.global_per_step = num_images, images_per_step, global_per_step
        self.seed, self.rank = seed, rank
        self.set_epoch(epoch, start_step)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch `epoch` from optimizer step `start_step` on (the keys depend on nothing else)."""
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step {start_step} is outside the epoch's {self.steps} steps")
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.num_images, generator=seeded_generator(derive_seed(self.seed, self.epoch)))
        for step in range(self.start_step, self.steps):
            first = step * self.global_per_step + self.rank * self.images_per_step
            for index in order[first : first + self.images_per_step].tolist():
                yield index, derive_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.images_per_step


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world_size, ... of range(num_images): one rank's share of an evaluation
    pass. Every image is read by exactly one rank and none twice (no padding, unlike
    DistributedSampler), so sums and counts gathered over ranks are exact."""

    def __init__(self, num_images: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.num_images, self.rank, self.world_size = num_images, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_images, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_images, self.world_size))
