"""Preemption and kills (runner/preemption.py): SIGUSR1/SIGTERM checkpoint at the next step and exit 75,
a second signal exits at once, a launcher that dies stops its ranks, and a run killed with SIGKILL at any
moment resumes; every resume ends bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from runner import preemption

from tests.dist_helpers import Background, accelerate_config, checkpoints, wait_for_train_record
from tests.util import (COMMON, DIGITS, PYTHON, QUIET_LINES, REPO, assert_identical, assert_time_is_continuous,
                        clean_env, final_weights, ok, read_jsonl, records_so_far, run_train, torchrun)


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has installed a handler for `signum` (so the signal will not kill it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (signum - 1) & 1)


def start(args, tmp_path, env=None):
    cmd = [PYTHON, str(REPO / "runner/train.py")] + args + [f"run.root={tmp_path / 'runs'}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env or clean_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_step(run_dir: Path, step: int, proc, timeout=120, poll: float = 0.05) -> None:
    """Wait until the run has logged optimizer step `step` (metrics.jsonl is written every step)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(train_steps(run_dir), default=0) >= step:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(poll)
    raise TimeoutError(f"step {step} not reached")


def train_steps(run_dir: Path) -> list[int]:
    """The optimizer steps metrics.jsonl has logged so far."""
    return [r["step"] for r in records_so_far(run_dir) if r["split"] == "train"]


@pytest.mark.slow
def test_time_is_continuous_after_a_preemption(tmp_path):
    args = DIGITS + ["run.name=preempted", "log.every_steps=1", f"run.root={tmp_path / 'runs'}"]
    run_dir = tmp_path / "runs" / "preempted"
    launch = Background([PYTHON, str(REPO / "runner/train.py"), *args, "train.epochs=50"], tmp_path)
    try:
        wait_for_train_record(run_dir, launch)
        launch.proc.send_signal(signal.SIGUSR1)
        assert launch.wait(120) == 75, launch.tail()
    finally:
        launch.stop()
    assert "checkpoint saved" in launch.output
    ok(run_train(args + ["train.epochs=2"], tmp_path))
    assert_time_is_continuous(run_dir)


def test_signal_policy():
    """SIGUSR1 (time-limit warning) requeues; SIGTERM (scancel) does not; a duplicate delivery is ignored."""
    try:
        preemption.received = None
        preemption.handle(signal.SIGTERM, None)
        assert not preemption.should_requeue()
        preemption.handle(signal.SIGTERM, None)  # the same event passed on by a launcher: no exit
        assert preemption.received == signal.SIGTERM
        preemption.received = None
        preemption.handle(signal.SIGUSR1, None)
        assert preemption.should_requeue() and preemption.signal_name() == "SIGUSR1"
    finally:
        preemption.received = None


@pytest.mark.slow
def test_signal_that_kills_the_launcher_leaves_no_orphaned_ranks(tmp_path):
    """SIGUSR1 kills `accelerate launch` at once (torchelastic does not handle it). Its ranks must not
    train on unobserved: they notice that their launcher is gone, checkpoint, and stop; a restart resumes."""
    run_dir = tmp_path / "runs" / "orphan"
    args = ["--config", "digits", "train.epochs=40", "checkpoint.every_epochs=0", "log.every_steps=1",
            "run.name=orphan", f"run.root={tmp_path / 'runs'}", *QUIET_LINES]
    launch = Background(accelerate_config("cpu_multi") + [str(REPO / "runner/train.py")] + args, tmp_path)
    try:
        ranks = [launch.worker(r) for r in (0, 1)]
        metrics = run_dir / "metrics.jsonl"
        launch.wait_for(lambda: metrics.exists() and len(read_jsonl(metrics)) >= 3, 120, "training")
        launch.proc.send_signal(signal.SIGUSR1)
        assert launch.wait(30) is not None, "the launcher survived SIGUSR1"
        gone, alive = psutil.wait_procs(ranks, timeout=60)
        assert not alive, f"ranks {[p.pid for p in alive]} kept running without their launcher"
    finally:
        launch.stop()
    assert "stopped by the exit of its launcher" in launch.output, launch.tail()
    assert checkpoints(run_dir), "the ranks stopped without a checkpoint"
    assert not (run_dir / "summary.json").exists(), "the ranks trained on to the end"
    assert not (run_dir / "run.lock").exists()


def test_sigusr1_checkpoints_exits_75_and_resume_is_exact(reference, tmp_path):
    args = COMMON + ["run.name=sig", "log.every_steps=1"]
    proc = start(args, tmp_path)
    wait_for_step(tmp_path / "runs" / "sig", 3, proc)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-2000:]
    assert "stopped by SIGUSR1" in out
    saved = sorted(p.name for p in (tmp_path / "runs" / "sig" / "checkpoints").glob("step_*"))
    assert saved and saved[-1] != "step_00000012", "the run must stop early, not finish"
    result = ok(run_train(args, tmp_path))  # resume=auto is the default
    assert "resumed from" in result.stdout
    assert_identical(final_weights(reference), final_weights(tmp_path / "runs" / "sig"))
    steps = [r["step"] for r in read_jsonl(tmp_path / "runs" / "sig" / "metrics.jsonl") if r["split"] == "train"]
    assert steps == sorted(set(steps)), "metrics.jsonl must not repeat steps after a resume"


def test_second_signal_exits_at_once(tmp_path):
    proc = start(COMMON + ["run.name=twice", "log.every_steps=1", "train.epochs=50"], tmp_path)
    wait_for_step(tmp_path / "runs" / "twice", 2, proc)
    proc.send_signal(signal.SIGUSR1)  # two different signals: two of one kind may merge while pending
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM


@pytest.mark.slow
def test_two_process_resume_is_bit_identical(tmp_path):
    env = clean_env(tmp_path)
    args = COMMON + ["log.every_steps=1"]
    ok(run_train(args + ["run.name=ref2"], tmp_path, launcher=torchrun(2), env=env))
    cmd = torchrun(2) + [str(REPO / "runner/train.py")] + args + ["run.name=sig2", f"run.root={tmp_path / 'runs'}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(tmp_path / "runs" / "sig2", 4, proc)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGUSR1)  # one rank only: the ranks must still agree to stop together
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "stopped by" in out, out[-3000:]
    result = ok(run_train(args + ["run.name=sig2"], tmp_path, launcher=torchrun(2), env=env))
    assert "resumed from" in result.stdout
    assert_identical(final_weights(tmp_path / "runs" / "ref2"), final_weights(tmp_path / "runs" / "sig2"))


@pytest.mark.slow
def test_kill_9_at_random_moments_never_loses_a_complete_checkpoint(tmp_path, train_main):
    """Repeatedly SIGKILL a run (often mid-save, with a save every step); it always resumes and ends exact.

    Every kill must land: on a process still running, after it trained at least one new step since it
    started, so each one interrupts training or a save rather than a start-up or a finished run."""
    args = COMMON + ["train.epochs=4", "checkpoint.every_steps=1", "log.every_steps=1"]  # 24 steps
    ok(train_main(args + ["run.name=whole"]))  # the uninterrupted trajectory
    run_dir = tmp_path / "runs" / "killed"
    delays = [0.0, 0.02, 0.01, 0.035, 0.005]  # after a new step is logged; a step and its save take ~40 ms here
    kills, mid_save = 0, 0
    for delay in delays:
        trained = max(train_steps(run_dir), default=0)
        proc = start(args + ["run.name=killed"], tmp_path)
        wait_for_step(run_dir, trained + 1, proc, poll=0.005)
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended before kill {kills + 1}: {proc.communicate()[0][-3000:]}"
        proc.kill()
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, proc.returncode
        kills += 1
        mid_save += bool(list((run_dir / "checkpoints").glob(".tmp-*")))  # a save or a pruning under way
        whole = [p.name for p in (run_dir / "checkpoints").glob("step_*") if (p / "manifest.json").exists()]
        assert sorted(whole) == sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")), "a step_N half gone"
    print(f"{kills} kills landed mid-run, {mid_save} of them mid-save or mid-pruning; "
          f"last logged step {max(train_steps(run_dir))} of 24")
    assert kills == len(delays) and not (run_dir / "summary.json").exists()
    result = ok(run_train(args + ["run.name=killed"], tmp_path))
    assert "resumed from" in result.stdout, result.stdout[-3000:]
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "a half-written or half-removed checkpoint was kept"
    assert_identical(final_weights(tmp_path / "runs" / "whole"), final_weights(run_dir))


@pytest.mark.slow
def test_preempted_fast_dev_run_saves_nothing(tmp_path):
    root = tmp_path / "runs"
    proc = subprocess.Popen([PYTHON, str(REPO / "runner/train.py"), *DIGITS, "train.fast_dev_run=3",
                             f"run.root={root}"], cwd=REPO, env=clean_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not catches(proc.pid, signal.SIGUSR1):
        assert proc.poll() is None and time.monotonic() < deadline, "the handler was never installed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)  # during start-up: kept, and acted on at the first steps
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, out[-3000:]
    assert "checkpoint saved" not in out and "nothing saved" in out, out[-3000:]
    assert not root.exists() or not any(root.iterdir()), sorted(p.name for p in root.rglob("*"))

