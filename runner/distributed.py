"""Process-group setup: the Accelerator, CPU threads, the collective timeout and launch sanity checks."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import timedelta

import accelerate.optimizer
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

from runner.config import setting
from runner.errors import UserError

# Accelerate's optimizer wrapper asks importlib whether the optional lomo_optim package exists twice on
# every step: as long as a whole step of a small model. The answer cannot change during a run.
accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)

@dataclass
class DistConfig:
    timeout_s: int = setting(300, min=1)   # a collective waiting longer than this fails instead of hanging
    threads: int = setting(0, min=0)       # CPU threads per process; 0: the host's cores / local processes
    cudnn_benchmark: bool = True           # let cuDNN pick the fastest convolution kernels (GPU; fixed shapes)


def cpu_threads(requested: int) -> int:
    """Split the cores between the processes on this host, so N processes do not oversubscribe N cores."""
    if requested:
        return requested
    if os.environ.get("SLURM_CPUS_PER_TASK"):  # Slurm already bound this task to its own cores
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
                or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local))


def launched_world_size() -> int:
    """The world size the launcher meant to start (torchrun/accelerate set WORLD_SIZE)."""
    slurm_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "WORLD_SIZE" not in os.environ and slurm_tasks > 1:
        raise UserError(f"srun started {slurm_tasks} tasks but none of them knows its rank, so each would train "
                        f"alone on all the data; run each task through launch/slurm_task.sh (as slurm/cpu.sbatch "
                        f"does) or one `accelerate launch` per node")
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_launcher_precision(requested: str) -> None:
    """A launch config that asks for bf16/fp16 while the run's config says otherwise is a mistake: say so,
    rather than let one silently win."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher not in ("no", requested):
        raise UserError(f"the launcher asks for mixed precision {launcher} but train.mixed_precision={requested}; "
                        f"add train.mixed_precision={launcher} or launch without it")


def make_accelerator(cfg: DistConfig, mixed_precision: str, accumulation: int, run_dir,
                     trackers: list[str]) -> Accelerator:
    torch.set_num_threads(cpu_threads(cfg.threads))
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    # Without a GPU, force the CPU: then `accelerate launch --multi_gpu` gives real gloo ranks instead of
    # N independent copies that each train on everything.
    cpu = not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=accumulation,
        # The loop steps the scheduler itself, once per optimizer step, whatever the world size.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.timeout_s)),
                         # Gradients live in DDP's buckets: one copy fewer per step.
                         DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tracking")),
        log_with=trackers or None,
    )
    if accelerator.num_processes != launched_world_size():
        raise UserError(f"the launcher asked for {launched_world_size()} processes but only "
                        f"{accelerator.num_processes} joined the process group; each would train on all the "
                        f"data. On a CPU-only host launch with `accelerate launch --multi_gpu "
                        f"--num_processes N` or `torchrun --nproc_per_node N`")
    return accelerator


def check_world_fits(world: int, micro_batch: int, num_train: int, num_eval: int) -> None:
    if world * micro_batch > num_train:
        raise UserError(f"world size {world} x train.micro_batch_size {micro_batch} = {world * micro_batch} "
                        f"samples per micro-step, but the training set holds only {num_train}")
    if world > num_eval:
        raise UserError(f"world size {world} is larger than the evaluation set ({num_eval} samples)")
