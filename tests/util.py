"""Helpers shared by the test modules: running the runner as users do (real processes, real launchers), and
the common arguments and assertions. Fixtures live in tests/conftest.py."""
from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
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


def records_so_far(run_dir: Path) -> list[dict]:
    """metrics.jsonl while a run writes it: its complete records (a line being written is left out)."""
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------- shared by the suites

# Small and quiet defaults for runs whose trackers and plot are not under test.
QUIET = ["log.trackers=[]", "log.plot=false"]
# The same, for launches read line by line in the background (tests/dist_helpers.Background).
QUIET_LINES = QUIET + ["log.progress=lines"]
DIGITS = ["--config", "digits", *QUIET]
SHORT_EPOCH = ["train.epochs=1", "train.limit_train_steps=8"]
# A five-step digits run (named `disk`: the fault tests put its run root on a small filesystem).
DISK_ARGS = ["--config", "digits", "train.epochs=1", "train.limit_train_steps=5", "log.trackers=[]",
             "log.plot=false", "run.name=disk"]
# Two epochs of 6 steps at global batch 64: resumable at step K = 5 (mid-epoch 1) on any world size.
RESUMABLE = DIGITS + ["train.epochs=2", "train.limit_train_steps=6", "train.global_batch_size=64"]
STOP_AT = 5
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")
SWEEP = str(REPO / "runner" / "sweep.py")
COMPARE = str(REPO / "runner" / "compare.py")

# SimpleCNN on digits with crop+flip, accumulation 2 and a cosine schedule: every piece of state matters.
# The run that exact-resume tests compare with (the `reference` fixture), 12 optimizer steps.
COMMON = ["--config", "digits", "model.name=simple_cnn", "model.kwargs={width: 4, hidden: 16}",
          "train.epochs=2", "train.micro_batch_size=16", "train.global_batch_size=64", "data.crop_padding=2",
          "data.flip=true", "schedule.name=cosine", "schedule.warmup_steps=3", "log.trackers=[]",
          "log.plot=false", "train.limit_train_steps=6"]


def ok(result, label: str | None = None, clean: bool = False):
    """`result` (a CompletedProcess or an in-process MainResult) after asserting exit code 0 (and, `clean`,
    that no traceback was printed); the failure message shows `label` and the ends of stdout and stderr."""
    output = f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"
    assert result.returncode == 0, f"{label or 'command'} exited {result.returncode}\n{output}"
    assert not clean or "Traceback" not in result.stdout + result.stderr, output
    return result


def error_line(result, code: int = 2) -> str:
    """The single stderr line of a failed run; asserts the exit code (2: bad input, 3: a lost rank), no
    traceback anywhere and nothing else on stderr."""
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def write(path, text: str):
    path.write_text(text)
    return path


def final_weights(run_dir: Path) -> dict:
    """model.safetensors of the newest checkpoint."""
    from safetensors.torch import load_file

    newest = sorted((Path(run_dir) / "checkpoints").glob("step_*"))[-1]
    return load_file(newest / "model.safetensors")


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), f"{key} differs"


def folder_args(root: Path, *extra: str) -> list[str]:
    """A small linear run on an image folder (tests/sample_files.write_folder)."""
    return ["--config", "digits", "data.name=folder", f"data.root={root}", "model.name=linear", "model.kwargs={}",
            "train.epochs=4", "train.micro_batch_size=12", "train.global_batch_size=12", *QUIET,
            *extra]


@dataclass
class MainResult:
    returncode: int
    stdout: str
    stderr: str
    run_root: Path


def reset_accelerate() -> None:
    """Accelerate keeps its state in process-wide singletons; each in-process run starts from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_tool(script: str, args: list, tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python script args` (runner/sweep.py, runner/compare.py) from tmp_path."""
    return subprocess.run([PYTHON, script, *map(str, args)], cwd=tmp_path, env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def table_rows(markdown: str) -> list[dict]:
    """The rows of the first table in the text (compare.py may print a table of seed groups after it)."""
    text = markdown[markdown.index("\n| "):]
    lines = list(itertools.takewhile(lambda line: line.startswith("|"), text.strip("\n").splitlines()))
    lines = [line for line in lines if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


def last_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "checkpoints" / "last" / "model.safetensors")


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)


def assert_time_is_continuous(run_dir: Path) -> None:
    stored = summary(run_dir)
    assert stored["segments"] == 2, stored
    assert stored["wall_seconds"] >= stored["segment_wall_seconds"], stored
    assert stored["train_seconds"] >= stored["segment_train_seconds"], stored
    times = [r["time"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert times == sorted(times), f"metrics.jsonl time goes backwards: {times}"


def make_unreadable(path: Path, kind: str) -> None:
    """Replace a data or config file by something that is not a readable regular file."""
    if path.exists():
        path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    elif kind == "endless device":
        path.symlink_to("/dev/zero")  # reading it would never end
    else:  # reading fails with EIO: an unreadable file that tests running as root can still make
        path.symlink_to("/proc/self/mem")
