"""Running the runner as users do: real processes, real launchers."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(tmp_path: Path, **extra) -> dict:
    """An environment without a user's accelerate config, and with one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_", "TORCHELASTIC"))}
    env.update({"HF_HOME": str(tmp_path / "hf_home"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_train(args: list[str], tmp_path: Path, launcher: list[str] | None = None, timeout: float = 300,
              env: dict | None = None, script: str = "runner/train.py") -> subprocess.CompletedProcess:
    """Run `[launcher] runner/train.py args` from the repo root with run.root under tmp_path."""
    cmd = (launcher or [PYTHON]) + [str(REPO / script)] + args
    if script == "runner/train.py" and not any(a.startswith("run.root=") for a in args):
        cmd.append(f"run.root={tmp_path / 'runs'}")
    return subprocess.run(cmd, cwd=REPO, env=env or clean_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


def accelerate_launch(n: int, port: int | None = None) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(n),
            "--main_process_port", str(port or free_port())]


def torchrun(n: int, port: int | None = None) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(n), "--master_port", str(port or free_port())]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())
