"""Who this process is: its place in the launch, from the launcher's variables (torch's own, else Slurm's,
else one process), and the report it sends rank 0 (host, ranks, device, versions, Slurm variables).

torch is imported inside the functions that use it (see runner/doctor.py).
"""
import importlib.metadata
import os
import platform
import socket
import subprocess
from dataclasses import dataclass

from runner.errors import UserError

SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_STEP_ID", "SLURM_PROCID",
              "SLURM_LOCALID", "SLURM_NODEID", "SLURMD_NODENAME", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
              "SLURM_JOB_NODELIST", "SLURM_CPUS_PER_TASK", "SLURM_GPUS_ON_NODE", "SLURM_RESTART_COUNT")


@dataclass
class Launch:
    rank: int
    world: int
    local_rank: int
    local_world: int | None   # what the launcher says runs on this node, when it says
    node_rank: int
    master_addr: str
    master_port: int
    launcher: str


def first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or ""
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        hosts = []
    return hosts[0] if hosts else "127.0.0.1"


def env_int(*names: str, default: int | None = None) -> int | None:
    for name in names:
        text = (os.environ.get(name) or "").split("(")[0]  # SLURM_TASKS_PER_NODE style "2(x3)"
        if text.strip():
            try:
                return int(text)
            except ValueError:
                raise UserError(f"{name}={os.environ[name]!r} is not an integer") from None
    return default


def detect_launch() -> Launch:
    """The rank layout from the launcher's variables: torch's own, else Slurm's, else one process."""
    node_rank = env_int("GROUP_RANK", "NODE_RANK", "SLURM_NODEID", default=0)
    if "RANK" in os.environ:
        launcher = ("torchrun/accelerate" if os.environ.get("TORCHELASTIC_RUN_ID")
                    else "srun + slurm_task.sh" if os.environ.get("SLURM_PROCID") else "environment")
        addr, port = os.environ.get("MASTER_ADDR"), env_int("MASTER_PORT")
        if not addr or port is None:
            raise UserError("RANK is set but MASTER_ADDR or MASTER_PORT is not; launch with torchrun, accelerate "
                            "launch or launch/slurm_task.sh, or set both")
        return Launch(env_int("RANK"), env_int("WORLD_SIZE", default=1), env_int("LOCAL_RANK", default=0),
                      env_int("LOCAL_WORLD_SIZE"), node_rank, addr, port, launcher)
    if "SLURM_PROCID" in os.environ and "SLURM_JOB_ID" in os.environ:
        # Bare `srun python runner/doctor.py`: the same rules as launch/slurm_task.sh.
        return Launch(env_int("SLURM_PROCID"), env_int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1),
                      env_int("SLURM_LOCALID", default=0), None, node_rank,
                      os.environ.get("RUNNER_MASTER_ADDR") or first_slurm_host(),
                      env_int("RUNNER_MASTER_PORT", default=10000 + env_int("SLURM_JOB_ID") % 20000), "srun")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Launch(0, 1, 0, 1, 0, "127.0.0.1", port, "single process")


def use_gpu(backend: str) -> bool:
    import torch

    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return backend != "gloo" and not forced_cpu and torch.cuda.is_available()


def versions(gpu: bool) -> dict:
    import torch

    nccl = "-"
    if gpu:
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError):
            nccl = "unavailable"
    try:
        accelerate = importlib.metadata.version("accelerate")
    except importlib.metadata.PackageNotFoundError:
        accelerate = "not installed"
    return {"python": platform.python_version(), "torch": torch.__version__, "accelerate": accelerate,
            "nccl": nccl}


def rank_report(launch: Launch, backend: str, gpu: bool, master_ms: float | None) -> dict:
    import torch

    device = f"cuda:{launch.local_rank % max(1, torch.cuda.device_count())}" if gpu else "cpu"
    if gpu:
        device += f" {torch.cuda.get_device_name(int(device.split(':')[1]))}"
    host = socket.gethostname()
    return {
        "rank": launch.rank, "world": launch.world, "local_rank": launch.local_rank,
        "local_world": launch.local_world, "node_rank": launch.node_rank, "host": host,
        "node": os.environ.get("SLURMD_NODENAME") or host, "pid": os.getpid(), "device": device,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"), "backend": backend,
        "versions": versions(gpu), "slurm": {k: os.environ[k] for k in SLURM_KEYS if k in os.environ},
        "master_ms": master_ms, "launcher": launch.launcher,
    }
