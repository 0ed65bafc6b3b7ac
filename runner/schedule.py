"""Learning-rate schedules with linear warmup, as pure functions of the optimizer step.

Every schedule is a LambdaLR multiplier, so the learning rate at any step is known without replaying the
past, and the scheduler is stepped by the loop once per optimizer step, whatever the number of processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from runner.config import setting
from runner.errors import ConfigError

NAMES = ["constant", "step", "multistep", "cosine", "onecycle"]
# Planned over the run's length: at the last step they have reached their end. A longer run is another plan.
SPAN_DEPENDENT = ("cosine", "onecycle")


@dataclass
class ScheduleConfig:
    name: str = setting("constant", choices=NAMES, fingerprint=True)
    warmup_steps: int = setting(0, min=0, fingerprint=True)
    warmup_start_factor: float = setting(0.1, min=0.0, max=1.0, fingerprint=True)
    step_epochs: int = setting(1, min=1, fingerprint=True)  # step: decay every this many epochs
    milestones: list[int] = setting([], fingerprint=True)  # multistep: epochs at which to decay
    gamma: float = setting(0.1, above=0.0, fingerprint=True)  # step, multistep: decay factor
    min_lr_factor: float = setting(0.0, min=0.0, max=1.0, fingerprint=True)  # cosine, onecycle: floor as a fraction of lr
    pct_start: float = setting(0.25, above=0.0, max=1.0, fingerprint=True)  # onecycle: fraction of steps rising

    def validate(self):
        if sorted(self.milestones) != self.milestones or any(m < 1 for m in self.milestones):
            raise ConfigError(f"schedule.milestones={self.milestones}: expected increasing epochs >= 1")


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The multiplier of the base learning rate after `step` optimizer steps."""
    if cfg.name == "onecycle":
        rise = max(1, int(total_steps * cfg.pct_start))
        if step < rise:
            return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / rise
        progress = min(1.0, (step - rise) / max(1, total_steps - rise))
        return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    warm = 1.0
    if step < cfg.warmup_steps:
        warm = cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / cfg.warmup_steps
    epoch = step // max(1, steps_per_epoch)
    if cfg.name == "constant":
        decay = 1.0
    elif cfg.name == "step":
        decay = cfg.gamma ** (epoch // cfg.step_epochs)
    elif cfg.name == "multistep":
        decay = cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    else:  # cosine, after warmup, to min_lr_factor at the last step
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, max(0, step - cfg.warmup_steps) / span)
        decay = cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    return warm * decay


def replanned_note(cfg: ScheduleConfig, run_dir, finished_epochs, epochs: int) -> str | None:
    """A run that completed its epochs, given more: a schedule planned over its length has ended there (its
    learning rate at the floor). Continuing re-plans it over the new length (the multiplier is a function of
    the step and the span), so the learning rate rises again mid-run: say so, and how to get one schedule."""
    if cfg.name not in SPAN_DEPENDENT or not isinstance(finished_epochs, int) or epochs <= finished_epochs:
        return None
    return (f"note: {run_dir} completed its {finished_epochs} epochs with schedule.name={cfg.name}, which ended "
            f"there (learning rate at its floor); train.epochs={epochs} re-plans it over {epochs} epochs, so the "
            f"learning rate rises again from here and decays to the new end. For one {cfg.name} schedule over "
            f"{epochs} epochs, start a new run (another run.name)")


def build_scheduler(optimizer, cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, total_steps, steps_per_epoch))
