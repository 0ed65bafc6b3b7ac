"""Which samples each step sees (runner/data/order.py): the global order, shards and per-sample random bits are
pure functions of (seed, epoch, sample index), the same on any world size.
"""
from __future__ import annotations

import pytest
import torch

from runner.data.order import TrainOrder, sample_bits, sample_bits_one, shard_range
from runner.plan import Config, Plan, TrainConfig


def train_order(n: int, seed: int, global_batch: int, micro: int, world: int, rank: int,
                limit_train_steps: int = 0) -> TrainOrder:
    """The order a run with this batch layout trains in, from its plan's numbers."""
    train = TrainConfig(global_batch_size=global_batch, micro_batch_size=micro, limit_train_steps=limit_train_steps)
    return TrainOrder(Plan.resolve(Config(train=train), world).for_train_size(n), n, seed, rank)


@pytest.mark.parametrize("n", [100, 257])
def test_train_order_is_the_same_for_any_world_and_accumulation(n):
    """The samples behind each optimizer step depend only on (seed, epoch, step), and ranks are disjoint."""
    micro_for_world = {1: 4, 2: 4, 4: 4}  # global 16 = micro 4 x accumulation x world
    steps_by_layout = {}
    for world, accumulation in ((1, 4), (2, 2), (4, 1)):
        micro = micro_for_world[world]
        global_batch = micro * world * accumulation
        per_rank = []
        for rank in range(world):
            order = train_order(n, seed=5, global_batch=global_batch, micro=micro, world=world, rank=rank)
            assert order.accumulation == accumulation and order.steps_per_epoch == n // global_batch
            micro_batches = list(order.micro_batches(epoch=2))
            assert len(micro_batches) == order.steps_per_epoch * accumulation
            assert all(len(b) == micro for b in micro_batches)
            per_rank.append([torch.cat(micro_batches[s * accumulation:(s + 1) * accumulation])
                             for s in range(order.steps_per_epoch)])
        steps = []
        for s in range(n // global_batch):
            shards = [per_rank[r][s] for r in range(world)]
            together = torch.cat(shards)
            assert len(set(together.tolist())) == global_batch  # disjoint rank shards, no repeats
            steps.append(sorted(together.tolist()))
        steps_by_layout[(world, accumulation)] = steps
    layouts = list(steps_by_layout.values())
    assert layouts[0] == layouts[1] == layouts[2]
    used = [i for step in layouts[0] for i in step]
    assert len(set(used)) == len(used) and all(0 <= i < n for i in used)  # each sample at most once per epoch


def test_train_order_changes_with_epoch_and_seed_and_resumes_mid_epoch():
    order = train_order(64, seed=1, global_batch=8, micro=4, world=1, rank=0)
    epoch0 = torch.cat(list(order.micro_batches(0)))
    assert sorted(epoch0.tolist()) == list(range(64))
    assert not torch.equal(epoch0, torch.cat(list(order.micro_batches(1))))
    other_seed = train_order(64, seed=2, global_batch=8, micro=4, world=1, rank=0)
    assert not torch.equal(epoch0, torch.cat(list(other_seed.micro_batches(0))))
    resumed = torch.cat(list(order.micro_batches(0, start_step=3)))
    assert torch.equal(resumed, epoch0[3 * 8:])
    limited = train_order(64, seed=1, global_batch=8, micro=4, world=1, rank=0, limit_train_steps=2)
    assert limited.steps_per_epoch == 2 and torch.equal(torch.cat(list(limited.micro_batches(0))), epoch0[:16])


@pytest.mark.parametrize("n", [0, 1, 5, 7, 10, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shard_range_covers_each_index_exactly_once(n, world):
    shards = [shard_range(n, world, rank) for rank in range(world)]
    covered = [i for shard in shards for i in shard]
    assert covered == list(range(n))  # contiguous, in rank order, no gaps or overlaps
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_per_sample_bits_match_the_batched_ones():
    index = torch.tensor([0, 1, 7, 49_999, 1 << 20])
    for seed, epoch in ((0, 0), (3, 11), (12345, 2)):
        batched = sample_bits(seed, epoch, index)
        for i, bits in zip(index.tolist(), batched.tolist()):
            assert sample_bits_one(seed, epoch, i) & ((1 << 63) - 1) == bits & ((1 << 63) - 1)

