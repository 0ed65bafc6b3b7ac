"""The run directory `runs/<run.name>/`: its stable name, the resume policy and the config fingerprint."""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from runner.config import ConfigError, flatten
from runner.errors import UserError

# Keys whose change would make a resumed run differ from the run that wrote the checkpoint.
FINGERPRINT_KEYS = ("data.name", "data.val_fraction", "data.crop_padding", "data.flip", "data.synthetic_size",
                    "data.synthetic_shape", "data.synthetic_classes", "model.name", "model.kwargs",
                    "train.global_batch_size", "train.seed", "train.label_smoothing", "train.grad_clip",
                    "train.mixed_precision", "train.overfit_batches", "train.limit_train_batches")
FINGERPRINT_PREFIXES = ("optim.", "schedule.")


@dataclass
class RunConfig:
    name: str = ""           # default: the config's name, plus the Slurm job id under Slurm
    root: str = "runs"
    overwrite: bool = False  # with resume=none: delete the checkpoints already in the run directory
    requeue: bool = True     # under Slurm: requeue the job after a preemption checkpoint

    def validate(self):
        if self.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(f"run.name={self.name!r}: use letters, digits, '.', '_' and '-' only")


def default_run_name(config_label: str) -> str:
    """Stable across Slurm requeues and torchrun restarts, so a restarted job finds its checkpoints."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{config_label}-{array}_{task}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"{config_label}-{os.environ['SLURM_JOB_ID']}"
    return config_label


def fingerprint(config_dict: dict) -> dict:
    flat = flatten(config_dict)
    return {k: v for k, v in flat.items() if k in FINGERPRINT_KEYS or k.startswith(FINGERPRINT_PREFIXES)}


def check_fingerprint(saved: dict, current: dict, checkpoint: Path) -> None:
    differing = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if differing:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in differing)
        raise UserError(f"checkpoint {checkpoint} was written with a different config ({detail}); "
                        f"use another run.name, or resume=none run.overwrite=true to start over")


def prepare_run_dir(run_dir: Path, resume: str, overwrite: bool, has_checkpoints: bool) -> None:
    """Enforce the resume policy before anything is written. Main process only."""
    if resume == "none" and has_checkpoints:
        if not overwrite:
            raise UserError(f"{run_dir} already holds checkpoints and resume=none; use resume=auto to continue "
                            f"it, run.overwrite=true to start over, or another run.name")
        shutil.rmtree(run_dir / "checkpoints")
        for stale in ("metrics.jsonl", "summary.json"):
            (run_dir / stale).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
