"""Process-group setup: the Accelerator, CPU threads, the collective timeout and launch sanity checks."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from runner.config import setting
from runner.errors import UserError, shown

# Below this much work per micro-step (forward + backward), extra threads only add synchronisation, and
# their spin-waiting collapses throughput (measured 16x) as soon as another process shares the cores.
SMALL_STEP_FLOPS = 100e6


@dataclass
class DistConfig:
    timeout_s: int = setting(300, min=1, max=7 * 24 * 3600)  # a collective waiting longer fails instead of hanging
    threads: int = setting(0, min=0, max=1024)   # CPU threads per process; 0: chosen from the cores and the model
    cudnn_benchmark: bool = True                 # let cuDNN pick the fastest convolution kernels (GPU; fixed shapes)
    debug: bool = False                          # PyTorch's distributed debugging and the NCCL flight recorder
    allow_emulated_bf16: bool = False            # run bf16 on a CPU without native bf16 anyway (several x slower)


def is_main_rank() -> bool:
    """Rank 0 of a launch: the one process that writes, prints and talks to trackers. Known from the
    launcher's environment, so it means the same before and after the process group exists."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def cpu_threads(requested: int, step_flops: float | None = None) -> int:
    """Split the cores between the processes on this host, so N processes do not oversubscribe N cores;
    one thread for a model whose steps are too small to share."""
    if requested:
        return requested
    if step_flops is not None and step_flops < SMALL_STEP_FLOPS:
        return 1
    if os.environ.get("SLURM_CPUS_PER_TASK"):  # Slurm already bound this task to its own cores
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
                or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local))


CPUINFO = Path("/proc/cpuinfo")


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: without either, bf16 autocast on the CPU is emulated and several times slower."""
    try:
        flags = set(CPUINFO.read_text().split())
    except OSError:
        return True  # cannot tell (not Linux): do not refuse
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def check_cpu_bf16(cfg: DistConfig) -> None:
    if not cfg.allow_emulated_bf16 and not cpu_has_native_bf16():
        raise UserError("train.mixed_precision=bf16 on this CPU: it has no native bf16 (neither AMX nor "
                        "AVX512-BF16), so bf16 would run several times slower than fp32; use "
                        "train.mixed_precision=no, or dist.allow_emulated_bf16=true to run it anyway")


def enable_debugging(dumps: Path, log) -> None:
    """Set before the process group starts: torch reads these once."""
    dumps.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "INFO")
    os.environ.setdefault("NCCL_DEBUG", "INFO")
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(dumps / "rank_"))
    log(f"dist.debug: TORCH_DISTRIBUTED_DEBUG=DETAIL, NCCL_DEBUG=INFO; NCCL flight-recorder dumps on a "
        f"collective timeout go to {dumps}/rank_<N>")


def launcher_integer(name: str, default: int, low: int, high: int, meaning: str) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise UserError(f"the launcher set {name}={shown(text)} ({meaning}): expected an integer from {low} to "
                        f"{high}; check the launch command or the job script that sets it")
    return value


def launched_world_size() -> int:
    """The world size the launcher meant to start (torchrun/accelerate set WORLD_SIZE), after checking the
    launcher's variables once, before any process group is tried: nonsense there would otherwise surface as
    a ZeroDivisionError, or as a wait for a process group that can never form."""
    slurm_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "WORLD_SIZE" not in os.environ and slurm_tasks > 1:
        raise UserError(f"srun started {slurm_tasks} tasks but none of them knows its rank, so each would train "
                        f"alone on all the data; run each task through launch/slurm_task.sh (as slurm/cpu.sbatch "
                        f"does) or one `accelerate launch` per node")
    world = launcher_integer("WORLD_SIZE", 1, 1, 1 << 20, "the number of processes")
    launcher_integer("RANK", 0, 0, world - 1, f"this process's rank in a world of {world}")
    local_world = launcher_integer("LOCAL_WORLD_SIZE", 1, 1, world, "the processes on this node")
    if "LOCAL_WORLD_SIZE" in os.environ:
        launcher_integer("LOCAL_RANK", 0, 0, local_world - 1, f"this process's rank among {local_world} on its node")
    else:
        launcher_integer("LOCAL_RANK", 0, 0, world - 1, "this process's rank on its node")
    launcher_integer("MASTER_PORT", 29500, 1, 65535, "the master's TCP port")
    return world


def check_launcher_precision(requested: str) -> None:
    """A launch config that asks for bf16/fp16 while the run's config says otherwise is a mistake: say so,
    rather than let one silently win."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher not in ("no", requested):
        raise UserError(f"the launcher asks for mixed precision {launcher} but train.mixed_precision={requested}; "
                        f"add train.mixed_precision={launcher} or launch without it")


def make_accelerator(cfg: DistConfig, mixed_precision: str, world: int, run_dir: Path | None = None,
                     trackers: list[str] = ()):
    """The Accelerator for `world` processes (the launched world size), or one line saying why not."""
    import accelerate.optimizer
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    # Accelerate's optimizer wrapper asks importlib whether the optional lomo_optim package exists twice on
    # every step: as long as a whole step of a small model. The answer cannot change during a run.
    if not hasattr(accelerate.optimizer.is_lomo_available, "cache_info"):
        accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)
    check_launcher_precision(mixed_precision)
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if mixed_precision == "bf16" and not torch.cuda.is_available():
        check_cpu_bf16(cfg)
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision=fp16 needs a CUDA GPU and this host has none; "
                        "use bf16 (autocast runs on CPU) or no")
    # Without a GPU, force the CPU: then `accelerate launch --multi_gpu` gives real gloo ranks instead of
    # N independent copies that each train on everything.
    cpu = not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        # Accumulation is driven by the loop (no_sync on all but the last micro-step of a window), so that
        # Accelerate's own micro-step counter, restored from a checkpoint written at another world size,
        # can never shift the windows.
        gradient_accumulation_steps=1,
        # The loop steps the scheduler itself, once per optimizer step, whatever the world size.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.timeout_s)),
                         # Gradients live in DDP's buckets: one copy fewer per step.
                         DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
        project_config=ProjectConfiguration(project_dir=run_dir and str(run_dir),
                                            logging_dir=run_dir and str(run_dir / "tracking")),
        log_with=list(trackers) or None,
    )
    if accelerator.num_processes != world:
        raise UserError(f"the launcher asked for {world} processes but only "
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


def communication_note(world: int, step_flops: float, parameters: int, device) -> str | None:
    """A line for the header when the gradient all-reduce likely costs more than the compute it spreads
    (CPU only, where the cost model is simple): suggest the faster process count."""
    if device.type != "cpu":
        return None
    # Rough CPU figures on gloo: ~20 GFLOP/s per core of compute, ~1 GB/s and ~0.3 ms per all-reduce.
    compute_s = step_flops / 20e9
    allreduce_s = 3e-4 + 2 * 4 * parameters / 1e9
    if world > 1 and allreduce_s > compute_s:
        return (f"note: this model is communication-bound at {world} processes (a step computes for ~"
                f"{1e3 * compute_s:.2f} ms and all-reduces {4 * parameters / 1e6:.2f} MB for ~{1e3 * allreduce_s:.2f} ms); "
                f"1 process with the same global batch is likely faster")
    return None
