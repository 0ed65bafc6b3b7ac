"""Stop signals keep their promise until the process is gone: the same SIGUSR1/SIGTERM again while the run
saves and exits is one event (exit 75), and Ctrl-C saves a checkpoint like a preemption and exits 130, in
one process and under torchrun, where the terminal signals the whole process group."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.util import PYTHON, REPO, clean_env, read_jsonl, run_train, torchrun

DIGITS = ["--config", "digits", "log.trackers=[]", "log.plot=false", "log.every_steps=1"]
# A SimpleCNN run long enough to be signalled while it trains.
LONG = DIGITS + ["model.name=simple_cnn", "model.kwargs={width: 4, hidden: 16}", "train.epochs=50"]


def start(args: list, tmp_path: Path, launcher: list | None = None) -> subprocess.Popen:
    """A run in a session of its own (a terminal's process group), with SIGINT handled as in a terminal: a
    child started in the background would inherit SIGINT ignored."""
    cmd = (launcher or [PYTHON]) + [str(REPO / "runner/train.py"), *args, f"run.root={tmp_path / 'runs'}"]
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if any(r.get("split") == "train" and r["step"] >= step for r in read_jsonl(run_dir / "metrics.jsonl")):
                return
        except (OSError, ValueError):  # not there yet, or a line being written
            pass
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise TimeoutError(f"step {step} not reached")


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").is_dir() else []


def handles_signal(pid: int, sig: int) -> bool:
    """Whether the process has a handler for `sig` (SigCgt in /proc/<pid>/status): the runner's stop
    handlers are installed as the command starts, before torch is imported."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_the_same_signal_repeated_while_stopping_is_one_event(tmp_path, sig):
    """A launcher or Slurm passing the signal on again: repeats every 30 ms until the process is gone (all
    within 2 s) never kill it, also while Python shuts down; it saves and exits 75, not 128+N."""
    run_dir = tmp_path / "runs" / "twice"
    proc = start(LONG + ["run.name=twice"], tmp_path)
    try:
        wait_for_step(run_dir, 3, proc)
        proc.send_signal(sig)
        first = time.monotonic()
        while proc.poll() is None and time.monotonic() - first < 1.8:
            time.sleep(0.03)
            proc.send_signal(sig)
        out = proc.communicate(timeout=120)[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 75, f"exit {proc.returncode}:\n{out[-3000:]}"
    assert f"stopped by {signal.Signals(sig).name}" in out and checkpoints(run_dir), out[-3000:]


def ctrl_c_at_step_3(args: list[str], run_dir, tmp_path, launcher=None, timeout: float = 120):
    """(the process, its output) after a terminal's Ctrl-C (SIGINT to the process group) at step 3."""
    proc = start(args, tmp_path, launcher=launcher)
    try:
        wait_for_step(run_dir, 3, proc)
        os.killpg(proc.pid, signal.SIGINT)
        return proc, proc.communicate(timeout=timeout)[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None


def test_ctrl_c_saves_a_checkpoint_exits_130_and_the_run_resumes(tmp_path):
    """The first Ctrl-C (SIGINT to the process group) stops like a preemption without requeue: a checkpoint
    at the next optimizer step, exit 130; the next start resumes from it."""
    run_dir = tmp_path / "runs" / "ctrlc"
    args = LONG + ["run.name=ctrlc"]
    proc, out = ctrl_c_at_step_3(args, run_dir, tmp_path)
    assert proc.returncode == 130, f"exit {proc.returncode}:\n{out[-3000:]}"
    assert "Traceback" not in out and "stopped by SIGINT" in out, out[-3000:]
    saved = checkpoints(run_dir)
    assert saved, f"Ctrl-C must save a checkpoint:\n{out[-3000:]}"
    step = int(saved[-1].name.split("_")[1])
    resumed = run_train(args + [f"train.max_steps={step + 2}"], tmp_path)
    assert resumed.returncode == 0 and f"resumed from {saved[-1]}" in resumed.stdout, resumed.stdout[-3000:]


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """Ctrl-C pressed again (1.2 s later, while the run is still starting: torch alone takes longer to
    import) exits at once with 130: no checkpoint, no run directory written."""
    proc = start(LONG + ["run.name=impatient"], tmp_path)
    try:
        deadline = time.time() + 60
        # Python's own SIGINT handler comes earlier; the runner installs SIGUSR1's after its SIGINT handler.
        while not handles_signal(proc.pid, signal.SIGUSR1):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        # More than CTRL_C_REPEAT_S (0.5 s) apart, even if the first one is handled late (during an import).
        time.sleep(1.2)
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        out = proc.communicate(timeout=60)[0]
        took = time.monotonic() - sent
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 130 and took < 2, (proc.returncode, took, out[-3000:])
    assert not checkpoints(tmp_path / "runs" / "impatient")


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_on_every_rank(tmp_path):
    """Ctrl-C in a terminal signals torchrun and both ranks, and torchrun passes it on to the ranks again:
    the ranks count it once, agree, save one checkpoint and stop; the run resumes from it."""
    run_dir = tmp_path / "runs" / "ctrlc2"
    args = LONG + ["run.name=ctrlc2"]
    _, out = ctrl_c_at_step_3(args, run_dir, tmp_path, launcher=torchrun(2), timeout=180)
    assert "stopped by SIGINT" in out and 'runner/train.py", line' not in out, out[-3000:]
    assert "interrupted" not in out, out[-3000:]
    saved = checkpoints(run_dir)
    assert saved and (saved[-1] / "manifest.json").is_file(), out[-3000:]
    assert len(list(saved[-1].glob("random_states_*"))) == 2, sorted(p.name for p in saved[-1].iterdir())
