"""The plan (runner/plan.py): batch arithmetic on any world size, steps per epoch and in all, what is due
when, and the one-line errors for batch sizes that do not divide. The unit tests build configs directly;
the last two run the command line.
"""
from __future__ import annotations

import pytest

from runner.errors import ConfigError
from runner.errors import UserError
from runner.plan import Config, Plan, TrainConfig, batch_arithmetic
from runner.state import due
from runner.state import RunState

from tests.util import error_line


def plan(world: int = 1, **train) -> Plan:
    """Plan.resolve for a default config with these train.* settings."""
    return Plan.resolve(Config(train=TrainConfig(**train)), world)


# ---------------------------------------------------------------------------------------------- batch arithmetic

@pytest.mark.parametrize("world", [1, 2, 4])
def test_micro_batch_zero_splits_the_global_batch_over_the_world(world):
    assert batch_arithmetic(TrainConfig(global_batch_size=64, micro_batch_size=0), world) == (64, 64 // world, 1)
    with_accumulation = TrainConfig(global_batch_size=64, micro_batch_size=0, gradient_accumulation_steps=2)
    assert batch_arithmetic(with_accumulation, world) == (64, 32 // world, 2)


@pytest.mark.parametrize("world, accumulation", [(1, 8), (2, 4), (4, 2)])
def test_a_fixed_micro_batch_accumulates_to_the_global_batch(world, accumulation):
    cfg = TrainConfig(global_batch_size=64, micro_batch_size=8)
    assert batch_arithmetic(cfg, world) == (64, 8, accumulation)
    named = TrainConfig(global_batch_size=64, micro_batch_size=8, gradient_accumulation_steps=accumulation)
    assert batch_arithmetic(named, world) == (64, 8, accumulation)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_no_global_batch_is_micro_times_world_times_accumulation(world):
    assert batch_arithmetic(TrainConfig(global_batch_size=0, micro_batch_size=16), world) == (16 * world, 16, 1)
    cfg = TrainConfig(global_batch_size=0, micro_batch_size=16, gradient_accumulation_steps=3)
    assert batch_arithmetic(cfg, world) == (48 * world, 16, 3)


@pytest.mark.parametrize("train, world, says", [
    ({"global_batch_size": 0, "micro_batch_size": 0}, 1,
     "set train.global_batch_size (samples per optimizer step) or train.micro_batch_size"),
    ({"global_batch_size": 30, "micro_batch_size": 0}, 4,
     "train.global_batch_size=30 does not split evenly over world size 4; choose a global batch that is a "
     "multiple of the world size"),
    ({"global_batch_size": 64, "micro_batch_size": 0, "gradient_accumulation_steps": 3}, 2,
     "train.global_batch_size=64 does not split evenly over world size 2 x accumulation 3"),
    ({"global_batch_size": 64, "micro_batch_size": 0}, 128, "does not split evenly over world size 128"),
    ({"global_batch_size": 64, "micro_batch_size": 12}, 1,
     "train.global_batch_size=64 is not a multiple of train.micro_batch_size=12 x world size 1 = 12; nearest "
     "valid global batch: 60 or 72; micro batches that divide it: [8, 16, 32, 64]"),
    ({"global_batch_size": 64, "micro_batch_size": 12}, 2,
     "train.micro_batch_size=12 x world size 2 = 24; nearest valid global batch: 48 or 72; micro batches that "
     "divide it: [4, 8, 16, 32]"),
    ({"global_batch_size": 8, "micro_batch_size": 16}, 1, "nearest valid global batch: 16;"),
    ({"global_batch_size": 64, "micro_batch_size": 8, "gradient_accumulation_steps": 3}, 2,
     "train.gradient_accumulation_steps=3 contradicts global 64 / (micro 8 x world 2) = 4"),
])
def test_choices_that_do_not_divide_name_the_numbers_and_the_valid_ones(train, world, says):
    with pytest.raises(ConfigError) as refused:
        batch_arithmetic(TrainConfig(**train), world)
    assert says in str(refused.value)
    assert "\n" not in str(refused.value)


# ---------------------------------------------------------------------------------------------- the plan

@pytest.mark.parametrize("world", [1, 2, 4])
def test_resolve_takes_the_batch_arithmetic_and_the_debug_modes(world):
    normal = plan(world, global_batch_size=64, epochs=3)
    assert (normal.world, normal.global_batch, normal.micro_batch, normal.accumulation) == (world, 64, 64 // world, 1)
    assert normal.epochs == 3 and normal.overfit_samples == 0
    dev = plan(world, global_batch_size=64, epochs=3, fast_dev_run=2)
    assert dev.epochs == 1 and dev.steps_per_epoch_limit == 2 and dev.eval_batch_limit == 2
    overfit = plan(world, global_batch_size=64, overfit_batches=2)
    assert overfit.overfit_samples == 128


def test_for_train_size_counts_whole_windows_only():
    sized = plan(2, global_batch_size=64, micro_batch_size=8, epochs=3).for_train_size(1000)
    assert sized.accumulation == 4
    assert sized.steps_per_epoch == 1000 // 64 == 15  # the 40 samples left over would be a partial window
    assert sized.schedule_steps == sized.total_steps == 45
    assert plan(1, global_batch_size=64).for_train_size(64).steps_per_epoch == 1
    with pytest.raises(UserError, match=r"the training set \(63 samples\) is smaller than one global batch \(64\)"):
        plan(1, global_batch_size=64).for_train_size(63)


def test_limit_train_steps_caps_each_epoch():
    sized = plan(1, global_batch_size=64, epochs=3, limit_train_steps=4).for_train_size(1000)
    assert sized.steps_per_epoch == 4 and sized.schedule_steps == sized.total_steps == 12
    larger = plan(1, global_batch_size=64, epochs=3, limit_train_steps=100).for_train_size(1000)
    assert larger.steps_per_epoch == 15  # a limit above the epoch changes nothing


def test_max_steps_stops_the_run_but_the_schedule_spans_every_epoch():
    stopped = plan(1, global_batch_size=64, epochs=3, max_steps=20).for_train_size(1000)
    assert stopped.schedule_steps == 45 and stopped.total_steps == 20
    beyond = plan(1, global_batch_size=64, epochs=3, max_steps=100).for_train_size(1000)
    assert beyond.schedule_steps == beyond.total_steps == 45


def test_eval_samples_follow_the_eval_batch_limit():
    cfg = Config(train=TrainConfig(global_batch_size=64, limit_eval_batches=2))
    cfg.eval.batch_size = 100
    limited = Plan.resolve(cfg, 1)
    assert limited.eval_samples(1000) == 200 and limited.eval_samples(150) == 150 and limited.eval_samples(0) == 0
    assert plan(1, global_batch_size=64).eval_samples(1000) == 1000
    dev = plan(1, global_batch_size=64, fast_dev_run=3)
    assert dev.eval_samples(10_000) == 3 * dev.eval_batch


def test_out_of_steps_only_with_max_steps():
    unlimited = plan(1, global_batch_size=64)
    assert not any(unlimited.out_of_steps(step) for step in (0, 1, 10**9))
    limited = plan(1, global_batch_size=64, max_steps=5)
    assert [limited.out_of_steps(step) for step in (0, 4, 5, 6)] == [False, False, True, True]


def test_finished_by_epochs_max_steps_or_early_stopping():
    sized = plan(1, global_batch_size=64, epochs=2, max_steps=25).for_train_size(1000)
    assert not sized.finished(RunState(epoch=1, global_step=15))
    assert sized.finished(RunState(epoch=2, global_step=30))               # every epoch done
    assert sized.finished(RunState(epoch=1, global_step=25))               # train.max_steps reached
    assert sized.finished(RunState(epoch=0, global_step=3, early_stopped=True))
    assert plan(1, global_batch_size=64, epochs=3).finished(RunState(epoch=2, global_step=30)) is False


# ---------------------------------------------------------------------------------------------- what is due

@pytest.mark.parametrize("every_steps, every_epochs, step, epoch, epoch_done, expected", [
    (5, 0, 5, 0, False, True),
    (5, 0, 10, 1, True, True),
    (5, 0, 7, 0, False, False),
    (5, 0, 7, 1, True, False),      # every_epochs=0: an epoch's end is not an event
    (0, 2, 7, 2, True, True),
    (0, 2, 7, 3, True, False),
    (0, 2, 7, 2, False, False),     # mid-epoch: epoch-based events wait for the end of the epoch
    (0, 1, 3, 1, True, True),
    (3, 2, 9, 1, True, True),       # either rule makes it due
    (4, 2, 6, 2, True, True),
    (4, 2, 6, 1, True, False),
    (0, 0, 8, 4, True, False),      # both off: never
])
def test_due_every_steps_and_or_every_epochs(every_steps, every_epochs, step, epoch, epoch_done, expected):
    assert due(every_steps, every_epochs, step, epoch, epoch_done) is expected


# ---------------------------------------------------------------------------------------------- as a command

def test_global_batch_that_does_not_divide(train_main):
    result = train_main(["--config", "digits", "train.global_batch_size=100", "train.micro_batch_size=32"])
    line = error_line(result)
    assert "train.global_batch_size=100" in line and "train.micro_batch_size=32" in line
    lower = 100 // 32 * 32
    assert f"{lower} or {lower + 32}" in line  # the nearest valid global batches: 96 or 128
    divisors = [m for m in range(1, 101) if 100 % m == 0]
    assert str(divisors[-4:]) in line          # micro batches that do divide 100
    assert not result.run_root.exists()


def test_accumulation_that_contradicts_the_global_batch(train_main):
    line = error_line(train_main(["--config", "digits", "train.global_batch_size=64",
                                  "train.micro_batch_size=16", "train.gradient_accumulation_steps=2"]))
    assert "train.gradient_accumulation_steps=2" in line and "4" in line
