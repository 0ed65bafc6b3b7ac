"""Write which samples this rank would train and evaluate on, using the runner's own TrainOrder/shard_range.

    torchrun --nproc_per_node 3 tests/scripts/shard_probe.py OUT_DIR NUM_TRAIN GLOBAL MICRO NUM_EVAL SEED

Joins a real gloo process group (so a launcher that starts independent copies is caught: every copy would
say world 1), then writes OUT_DIR/rank_<rank>.json.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist

from runner.data.order import TrainOrder, shard_range
from runner.plan import Config, Plan, TrainConfig


def main() -> int:
    out, num_train, global_batch, micro, num_eval, seed = sys.argv[1], *map(int, sys.argv[2:7])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    train = TrainConfig(global_batch_size=global_batch, micro_batch_size=micro)
    order = TrainOrder(Plan.resolve(Config(train=train), world).for_train_size(num_train), num_train, seed, rank)
    # per optimizer step: the indices of this rank's micro-batches
    steps, batches = [], order.micro_batches(0)
    for _ in range(order.steps_per_epoch):
        steps.append([int(i) for _ in range(order.accumulation) for i in next(batches)])
    assert next(batches, None) is None, "micro_batches yielded more than steps_per_epoch x accumulation"
    shard = shard_range(num_eval, world, rank)
    record = {"rank": rank, "world": world, "env_world": int(os.environ["WORLD_SIZE"]),
              "accumulation": order.accumulation, "steps_per_epoch": order.steps_per_epoch,
              "train_steps": steps, "permutation": order.permutation(0).tolist(),
              "eval": [shard.start, shard.stop]}
    Path(out, f"rank_{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
