"""The plan of a run: every number the stages need, decided once from (config, launched world, data size).

The config says what the user asked for; the plan says what will happen: batch arithmetic, accumulation,
steps, epochs, evaluation limits. Nothing writes back into the config, and no stage re-derives a number the
plan holds. Whether anything is written at all is the run directory's to say (runner/rundir.py). This
module does not import torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from runner.checkpoint import CheckpointConfig
from runner.config import setting
from runner.data.splits import DataConfig
from runner.distributed import DistConfig
from runner.errors import ConfigError, UserError, shown
from runner.metrics import EvalConfig
from runner.model import ModelConfig
from runner.optim import OptimConfig
from runner.rundir import RunConfig
from runner.schedule import ScheduleConfig
from runner.tracking import LogConfig

MAX_SEED = 2**32 - 1  # numpy's bound; torch accepts it too
MAX_MICRO_BATCH = 2**20
AUTO = "auto"  # train.micro_batch_size=auto: start at global / world, halve on out-of-memory (runner/memory.py)


@dataclass
class TrainConfig:
    epochs: int = setting(10, min=1, max=10**6)
    max_steps: int = setting(0, min=0)    # stop after N optimizer steps (0: epochs decide); the schedule still spans epochs
    micro_batch_size: int | str = setting(0)  # per device, per forward pass (0: global / world; auto: shrinks on OOM)
    global_batch_size: int = setting(32, min=0, max=2**24, fingerprint=True)  # per optimizer step (0: micro x world)
    gradient_accumulation_steps: int = setting(0, min=0)    # 0: global / (micro x world)
    mixed_precision: str = setting("no", choices=["no", "bf16", "fp16"], fingerprint=True)
    seed: int = setting(0, min=0, max=MAX_SEED, fingerprint=True)
    grad_clip: float = setting(0.0, min=0.0, fingerprint=True)                  # max gradient norm (0: off)
    label_smoothing: float = setting(0.0, min=0.0, max=0.99, fingerprint=True)
    fast_dev_run: int = setting(0, min=0)                   # N steps and N eval batches, nothing saved
    overfit_batches: int = setting(0, min=0, fingerprint=True)  # train and evaluate on N global batches only
    limit_train_steps: int = setting(0, min=0, fingerprint=True)  # at most N optimizer steps per epoch
    limit_eval_batches: int = setting(0, min=0)             # at most N eval batches (of eval.batch_size)
    ema_decay: float = setting(0.0, min=0.0, max=1.0, fingerprint=True)  # weights' average (0: off; runner/ema.py)

    def validate(self):
        if self.ema_decay >= 1:
            raise ConfigError(f"train.ema_decay={self.ema_decay}: must be < 1 (0 turns the average off)")
        micro = self.micro_batch_size
        if isinstance(micro, str) and micro != AUTO:
            raise ConfigError(f"train.micro_batch_size={shown(micro)}: expected an integer or {AUTO}")
        if isinstance(micro, int) and not 0 <= micro <= MAX_MICRO_BATCH:
            raise ConfigError(f"train.micro_batch_size={micro}: must be >= 0 and <= {MAX_MICRO_BATCH}")
        if micro == AUTO and not self.global_batch_size:
            raise ConfigError(f"train.micro_batch_size={AUTO} needs train.global_batch_size: the micro batch "
                              f"may shrink, the samples per optimizer step may not")
        if micro == AUTO and self.gradient_accumulation_steps:
            raise ConfigError(f"train.gradient_accumulation_steps={self.gradient_accumulation_steps} with "
                              f"train.micro_batch_size={AUTO}: the accumulation follows the micro batch; leave it 0")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    resume: str = "auto"  # auto: newest complete checkpoint of this run; none: start fresh; or a checkpoint/handle

    def validate(self):
        if self.eval.monitor.startswith("ema_") and not self.train.ema_decay:
            raise ConfigError(f"eval.monitor={self.eval.monitor} needs train.ema_decay > 0 (the average it monitors)")


def load_run_config(run_dir, overrides: list) -> Config:
    """The config a run directory was trained with (its config.yaml), overrides applied on top."""
    from runner import config as configlib

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{config_file} does not exist: it tells which model and data the run's checkpoints hold")
    return configlib.load(Config, str(config_file), overrides)


def batch_arithmetic(cfg: TrainConfig, world: int) -> tuple[int, int, int]:
    """(global batch, micro batch, accumulation steps) from the user's knobs, or one line naming the valid
    choices. A preset pins the global batch and leaves the micro batch to the world size (0), so it is the
    same experiment on any number of processes."""
    micro, wanted = cfg.micro_batch_size, cfg.gradient_accumulation_steps
    if micro == AUTO:  # the largest micro batch first; runner/memory.py halves it if it does not fit
        micro = 0
    if not cfg.global_batch_size:
        if not micro:
            raise ConfigError("set train.global_batch_size (samples per optimizer step) or train.micro_batch_size")
        return micro * world * (wanted or 1), micro, wanted or 1
    if not micro:
        per_rank, remainder = divmod(cfg.global_batch_size, world * (wanted or 1))
        if remainder or not per_rank:
            raise ConfigError(f"train.global_batch_size={cfg.global_batch_size} does not split evenly over world "
                              f"size {world}" + (f" x accumulation {wanted}" if wanted else "")
                              + "; choose a global batch that is a multiple of the world size")
        return cfg.global_batch_size, per_rank, wanted or 1
    per_micro = micro * world
    if cfg.global_batch_size % per_micro:
        lower = cfg.global_batch_size // per_micro * per_micro
        options = " or ".join(str(g) for g in (lower, lower + per_micro) if g)
        micros = [m for m in range(1, cfg.global_batch_size // world + 1)
                  if cfg.global_batch_size % (m * world) == 0]
        raise ConfigError(f"train.global_batch_size={cfg.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={micro} x world size {world} = {per_micro}; nearest valid "
                          f"global batch: {options}; micro batches that divide it: {micros[-4:]}")
    accumulation = cfg.global_batch_size // per_micro
    if wanted and wanted != accumulation:
        raise ConfigError(f"train.gradient_accumulation_steps={wanted} contradicts global "
                          f"{cfg.global_batch_size} / (micro {micro} x world {world}) = {accumulation}")
    return cfg.global_batch_size, micro, accumulation


@dataclass(frozen=True)
class Plan:
    world: int
    micro_batch: int
    global_batch: int
    accumulation: int
    epochs: int
    max_steps: int                # 0: the epochs decide
    steps_per_epoch_limit: int    # debug modes: at most this many optimizer steps per epoch (0: no limit)
    eval_batch: int
    eval_batch_limit: int         # debug modes: at most this many eval batches per evaluation (0: no limit)
    overfit_samples: int          # train and evaluate on this many samples (0: off)
    auto_micro_batch: bool = False  # train.micro_batch_size=auto: the micro batch shrinks when memory runs out
    steps_per_epoch: int = 0      # known once the training set is loaded (for_train_size)
    schedule_steps: int = 0       # what the learning-rate schedule spans: every epoch, whatever max_steps says
    total_steps: int = 0          # what this run will take: max_steps stops it early, like a preemption

    @classmethod
    def resolve(cls, cfg: Config, world: int) -> "Plan":
        train = cfg.train
        global_batch, micro_batch, accumulation = batch_arithmetic(train, world)
        if train.micro_batch_size == AUTO and cfg.model.sync_batchnorm and world > 1:
            raise ConfigError(f"train.micro_batch_size={AUTO} with model.sync_batchnorm=true: SyncBatchNorm "
                              f"gathers across ranks inside the forward pass, so a rank out of memory there "
                              f"would strand the others; set one of them otherwise")
        dev_run = train.fast_dev_run
        return cls(world=world, micro_batch=micro_batch, global_batch=global_batch,
                   accumulation=accumulation, epochs=1 if dev_run else train.epochs, max_steps=train.max_steps,
                   steps_per_epoch_limit=dev_run or train.limit_train_steps, eval_batch=cfg.eval.start_batch,
                   eval_batch_limit=dev_run or train.limit_eval_batches,
                   overfit_samples=train.overfit_batches * global_batch,
                   auto_micro_batch=train.micro_batch_size == AUTO)

    def for_train_size(self, num_train: int) -> "Plan":
        """Whole global batches only: a partial accumulation window would be under-weighted."""
        steps = num_train // self.global_batch
        if steps == 0:
            raise UserError(f"the training set ({num_train} samples) is smaller than one global batch "
                            f"({self.global_batch}); lower train.global_batch_size or train.micro_batch_size")
        if self.steps_per_epoch_limit:
            steps = min(steps, self.steps_per_epoch_limit)
        total = steps * self.epochs
        return dataclasses.replace(self, steps_per_epoch=steps, schedule_steps=total,
                                   total_steps=min(total, self.max_steps) if self.max_steps else total)

    def with_micro_batch(self, micro_batch: int) -> "Plan":
        """The same experiment (global batch, steps) at another micro batch: accumulation makes up the rest."""
        per_rank = self.global_batch // self.world
        if per_rank % micro_batch:
            raise ValueError(f"micro batch {micro_batch} does not divide {per_rank} samples per rank and step")
        return dataclasses.replace(self, micro_batch=micro_batch, accumulation=per_rank // micro_batch)

    def fitting_micro_batch(self, at_most: int) -> int:
        """The largest micro batch of at most `at_most` samples that divides a rank's share of a step."""
        per_rank = self.global_batch // self.world
        return max(m for m in range(1, min(at_most, per_rank) + 1) if per_rank % m == 0)

    def eval_samples(self, split_size: int) -> int:
        """How much of a split an evaluation covers (debug modes evaluate only the first batches)."""
        limit = self.eval_batch_limit * self.eval_batch
        return min(split_size, limit) if limit else split_size

    def out_of_steps(self, global_step: int) -> bool:
        return bool(self.max_steps) and global_step >= self.max_steps

    def finished(self, state) -> bool:
        return state.early_stopped or self.out_of_steps(state.global_step) or state.epoch >= self.epochs
