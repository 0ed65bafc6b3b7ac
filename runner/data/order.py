"""Which samples each step sees: the global order and every augmentation draw are pure functions of
(seed, epoch, sample index).

Each optimizer step consumes the next `global_batch_size` samples of that order, split into
`accumulation` micro-steps of `micro_batch_size` samples per rank. So the samples behind an optimizer step
do not depend on the world size, the worker count or a resume: a resumed run and a run on another number
of processes see exactly the same batches, with the same augmentations.
"""
from __future__ import annotations

from typing import Iterator

import torch


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic; shifts masked to be logical)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def sample_key(seed: int, epoch: int) -> int:
    return ((seed * 1_000_003 + epoch) * 2_654_435_761) % (1 << 40)


def sample_bits(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """64 random bits per sample, a pure function of (seed, epoch, sample index)."""
    return mix64(index.long() * 0x9E3779B9 + sample_key(seed, epoch))


def sample_bits_one(seed: int, epoch: int, index: int) -> int:
    """sample_bits for one sample in plain Python (its low 63 bits are the same): the per-sample
    DataLoader path would spend longer on a dozen tiny tensor ops than on the crop itself."""
    mask = (1 << 64) - 1
    x = (index * 0x9E3779B9 + sample_key(seed, epoch)) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


class TrainOrder:
    """Which samples each rank uses at each micro-step: a pure function of (seed, epoch, step).

    The batch arithmetic and the steps per epoch are those of the run's plan (runner/plan.py's Plan, sized
    for this training set by for_train_size), taken as decided there, not derived again. The plan is not
    imported here for its type: plan.py imports runner/metrics.py, which imports shard_range from here."""

    def __init__(self, plan, num_samples: int, seed: int, rank: int):
        self.num_samples, self.seed, self.rank = num_samples, seed, rank
        self.global_batch, self.micro_batch, self.world = plan.global_batch, plan.micro_batch, plan.world
        self.accumulation, self.steps_per_epoch = plan.accumulation, plan.steps_per_epoch

    def regrouped(self, plan) -> "TrainOrder":
        """The same order cut into another plan's micro batches (train.micro_batch_size=auto shrinking):
        each optimizer step keeps its samples, and every sample its augmentation draws."""
        return TrainOrder(plan, self.num_samples, self.seed, self.rank)

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + epoch))

    def rank_rows(self, epoch: int, start_step: int = 0, device=None) -> torch.Tensor:
        """This rank's sample indices for the rest of the epoch, one row per micro-step.

        Micro-step k of a step covers the next micro_batch x world samples of the order; rank r takes the
        r-th micro_batch of them."""
        perm = self.permutation(epoch).to(device)
        rest = perm[start_step * self.global_batch:self.steps_per_epoch * self.global_batch]
        return rest.view(-1, self.world, self.micro_batch)[:, self.rank]

    def micro_batches(self, epoch: int, start_step: int = 0, device=None) -> Iterator[torch.Tensor]:
        yield from self.rank_rows(epoch, start_step, device)


def shard_range(n: int, world: int, rank: int) -> range:
    """Contiguous, disjoint, possibly uneven shards: evaluation counts each sample exactly once."""
    return range(n * rank // world, n * (rank + 1) // world)
