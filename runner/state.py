"""The runner's own progress: where the run is, its best evaluation so far and early stopping.

It is saved in every checkpoint as `run_state.json`: plain JSON read with json.loads and checked field by
field, so a tampered checkpoint can at worst hold wrong numbers, never run code.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

STATE_FILE = "run_state.json"

# How a run segment ended: the loop decides it, summary.json records it, and a run directory whose summary
# says FINISHED is not run again.
COMPLETED, EARLY_STOPPING, MAX_STEPS, PREEMPTED = "completed", "early_stopping", "max_steps", "preempted"
FINISHED = (COMPLETED, EARLY_STOPPING, MAX_STEPS)
OPTIONAL_FIELDS = ("micro_batch",)  # absent from checkpoints written before it was recorded


def due(every_steps: int, every_epochs: int, step: int, epoch: int, epoch_done: bool) -> bool:
    """Whether an event set as "every N steps and/or every N epochs" falls on this optimizer step (`epoch`:
    epochs completed; `epoch_done`: this step completed one). Each component asks it of its own settings."""
    return bool(every_steps and step % every_steps == 0) or bool(epoch_done and every_epochs
                                                                   and epoch % every_epochs == 0)


def checkpoint_name(step: int) -> str:
    """The one place that names a checkpoint directory."""
    return f"step_{step:08d}"


@dataclass
class RunState:
    epoch: int = 0                       # the epoch in progress
    step_in_epoch: int = 0               # optimizer steps already taken in that epoch
    global_step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0            # early-stopping counter
    early_stopped: bool = False
    train_seconds: float = 0.0           # training time of all earlier segments, up to this checkpoint
    wall_seconds: float = 0.0            # wall time of all earlier segments, up to this checkpoint
    segments: int = 1                    # processes (launches) that have worked on the run so far
    micro_batch: int = 0                 # the micro batch the run last trained at (auto resumes with it)
    fingerprint: dict = field(default_factory=dict)

    @property
    def best_checkpoint(self) -> str | None:
        return None if self.best_step is None else checkpoint_name(self.best_step)

    def advance(self, steps_per_epoch: int) -> bool:
        """Count one optimizer step; True when it completed an epoch."""
        self.step_in_epoch, self.global_step = self.step_in_epoch + 1, self.global_step + 1
        if self.step_in_epoch < steps_per_epoch:
            return False
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return True

    def record_eval(self, value: float, mode: str, min_delta: float, patience: int) -> bool:
        """Track the best value of the monitored metric and the patience counter; True if it improved."""
        improved = self.best_metric is None or (value < self.best_metric - min_delta if mode == "min"
                                                else value > self.best_metric + min_delta)
        if improved:
            self.best_metric, self.best_step, self.evals_since_best = value, self.global_step, 0
        else:
            self.evals_since_best += 1
        self.early_stopped = bool(patience) and self.evals_since_best >= patience
        return improved

    def write(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, directory: Path) -> "RunState":
        """Parse and type-check run_state.json; ValueError names the first field that is wrong."""
        raw = json.loads((directory / STATE_FILE).read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{STATE_FILE} must hold an object")
        state = cls()
        for f in fields(cls):
            if f.name not in raw and f.name in OPTIONAL_FIELDS:
                continue
            if f.name not in raw:
                raise ValueError(f"{STATE_FILE} lacks {f.name}")
            value, default = raw[f.name], getattr(state, f.name)
            expected = {int: (int,), float: (int, float), bool: (bool,), dict: (dict,)}.get(type(default))
            if f.name in ("best_metric", "best_step"):
                expected = (int, float, type(None)) if f.name == "best_metric" else (int, type(None))
            if not isinstance(value, expected) or (isinstance(value, bool) and expected != (bool,)):
                raise ValueError(f"{STATE_FILE}: {f.name}={value!r} has the wrong type")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0 \
                    and f.name != "best_metric":
                raise ValueError(f"{STATE_FILE}: {f.name}={value!r} is negative")
            setattr(state, f.name, value)
        return state
