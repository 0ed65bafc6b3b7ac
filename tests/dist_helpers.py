"""Helpers for the multi-process tests: background launches, finding a launcher's worker processes,
signalling one rank, and reading checkpoints. Only processes started here are ever signalled."""
from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil

from tests.util import BIN, REPO, clean_env, free_port, records_so_far

LAUNCH = REPO / "launch"
ACCELERATE = str(BIN / "accelerate")
TORCHRUN = str(BIN / "torchrun")


def accelerate_config(name: str, *options: str) -> list[str]:
    """`accelerate launch --config_file launch/<name>.yaml [options]`."""
    return [ACCELERATE, "launch", "--config_file", str(LAUNCH / f"{name}.yaml"), *options]


def torchrun(n: int, *options: str, port: int | None = None) -> list[str]:
    return [TORCHRUN, "--nproc_per_node", str(n), "--master_port", str(port or free_port()), *options]


def machine(rank: int, machines: int, port: int, per_machine: int = 1) -> list[str]:
    """One emulated machine of a multi-node launch through launch/multi_node.yaml."""
    return accelerate_config("multi_node", "--num_machines", str(machines),
                             "--num_processes", str(machines * per_machine), "--machine_rank", str(rank),
                             "--main_process_ip", "127.0.0.1", "--main_process_port", str(port))


class Background:
    """A launch running in the background; its merged stdout/stderr is collected line by line."""

    def __init__(self, cmd: list[str], tmp_path: Path, env: dict | None = None):
        self.cmd = cmd
        self.started = time.monotonic()
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env or clean_env(tmp_path), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, predicate, timeout: float, what: str, every: float = 0.1) -> None:
        """Poll `predicate()` until it holds; fail (with the output so far) on timeout or early exit."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"{what}: the launch exited ({self.proc.returncode}) first\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout:.0f} s\n{self.tail()}")
            time.sleep(every)

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if still running after `timeout` seconds."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(10)
        return rc

    def workers(self) -> dict[int, psutil.Process]:
        """The launcher's worker processes by global RANK (torchrun and accelerate start them as children)."""
        found = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rank is not None and "python" in child.name().lower():
                found[int(rank)] = child
        return found

    def worker(self, rank: int, timeout: float = 60) -> psutil.Process:
        self.wait_for(lambda: rank in self.workers(), timeout, f"worker of rank {rank}")
        return self.workers()[rank]

    def stop(self) -> None:
        """Kill this launch and every process under it (resuming stopped ones first)."""
        if self.proc.poll() is None:
            tree = psutil.Process(self.proc.pid).children(recursive=True) + [psutil.Process(self.proc.pid)]
        else:
            tree = []
        for p in tree:
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(10)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, with a manifest), oldest first."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if re.fullmatch(r"step_\d{8}", p.name)
                  and (p / "manifest.json").is_file())


def final_checkpoint(run_dir: Path) -> Path:
    found = checkpoints(run_dir)
    assert found, f"no checkpoint in {run_dir}/checkpoints"
    return found[-1]


def read_weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(checkpoint) / "model.safetensors"))


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def wait_for_train_record(run_dir: Path, launch: Background, timeout: float = 240) -> None:
    """Wait until the launch's metrics.jsonl holds a training step."""
    launch.wait_for(lambda: any(r["split"] == "train" for r in records_so_far(run_dir)), timeout,
                    "a training step")
