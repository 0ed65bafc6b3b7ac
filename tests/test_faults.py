"""Faults of the machine: a full disk or a read-only run directory gives one line and loses nothing."""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.util import run_train

ARGS = ["--config", "digits", "train.epochs=1", "train.limit_train_steps=5", "log.trackers=[]",
        "log.plot=false", "run.name=disk"]


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root and mount, as on CI); unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a small filesystem")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(mount: Path, leave_bytes: int) -> None:
    stat = os.statvfs(mount)
    free = stat.f_bavail * stat.f_frsize
    with open(mount / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


def test_full_disk_when_saving_keeps_earlier_checkpoints(small_disk, tmp_path):
    first = run_train(ARGS + [f"run.root={small_disk}"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoints = small_disk / "disk" / "checkpoints"
    before = snapshot(checkpoints)
    assert before
    fill(small_disk, leave_bytes=8 * 1024)
    second = run_train(ARGS + [f"run.root={small_disk}", "train.epochs=2"], tmp_path)
    assert second.returncode == 2, second.stdout[-1000:] + second.stderr[-2000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in second.stderr
    assert snapshot(checkpoints) == before, "earlier checkpoints changed"
    assert not list(checkpoints.glob(".tmp-*")), "a partial checkpoint was left behind"
    (small_disk / "filler").unlink()
    third = run_train(ARGS + [f"run.root={small_disk}", "train.epochs=2"], tmp_path)
    assert third.returncode == 0 and "resumed from" in third.stdout


def test_read_only_run_directory_gives_one_line(small_disk, tmp_path):
    first = run_train(ARGS + [f"run.root={small_disk}"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = snapshot(small_disk / "disk")
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_disk)]).returncode == 0
    second = run_train(ARGS + [f"run.root={small_disk}", "train.epochs=2"], tmp_path)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Read-only file system" in lines[0], second.stderr[-2000:]
    assert snapshot(small_disk / "disk") == before


def test_srun_tasks_without_ranks_are_refused(tmp_path):
    """`srun -n2 python runner/train.py` would start two copies that each train on everything."""
    from tests.util import clean_env

    env = clean_env(tmp_path, SLURM_STEP_NUM_TASKS=2, SLURM_JOB_ID=4242, SLURM_PROCID=0)
    result = run_train(ARGS, tmp_path, env=env)
    assert result.returncode == 2 and "launch/slurm_task.sh" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_signal_policy():
    """SIGUSR1 (time-limit warning) requeues; SIGTERM (scancel) does not; a duplicate delivery is ignored."""
    import signal

    from runner import preemption

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


def test_launcher_precision_must_agree_with_the_config(train_main, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    result = train_main(ARGS)
    assert result.returncode == 2 and "train.mixed_precision=bf16" in result.stderr
    agreed = train_main(ARGS + ["train.mixed_precision=bf16", "dist.allow_emulated_bf16=true"])
    assert agreed.returncode == 0 and "precision bf16" in agreed.stdout


@pytest.mark.slow
def test_signal_that_kills_the_launcher_leaves_no_orphaned_ranks(tmp_path):
    """SIGUSR1 kills `accelerate launch` at once (torchelastic does not handle it). Its ranks must not
    train on unobserved: they notice that their launcher is gone, checkpoint, and stop; a restart resumes."""
    import signal

    import psutil

    from tests.dist_helpers import QUIET, Background, accelerate_config, checkpoints
    from tests.util import REPO, read_jsonl

    run_dir = tmp_path / "runs" / "orphan"
    args = ["--config", "digits", "train.epochs=40", "checkpoint.every_epochs=0", "log.every_steps=1",
            "run.name=orphan", f"run.root={tmp_path / 'runs'}", *QUIET]
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
