"""The run directory (runner/rundir.py): its lock, the fingerprint of training keys (a new directory or a
refusal when they change), finished runs left as they are, and resume=none.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from runner.errors import UserError
from runner.checkpoint import CheckpointConfig, Checkpointer
from runner.ema import EmaWeights
from runner.plan import Config
from runner.rundir import RunConfig, RunDir, RunLock

from tests.dist_helpers import Background, wait_for_train_record
from tests.util import COMMON, DIGITS, PYTHON, REPO, SHORT_EPOCH, clean_env, ok, one_error_line, summary


def snapshot(root: Path) -> dict:
    """Every path under `root` with its bytes and mtime (symlinks: their target)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            st = p.lstat()
            body = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else None)
            found[str(p.relative_to(root))] = (body, st.st_mtime_ns)
    return found


def test_running_a_finished_run_again_changes_nothing(tmp_path, train_main):
    args = DIGITS + SHORT_EPOCH + ["run.name=done"]
    first = ok(train_main(args))
    run_dir = tmp_path / "runs" / "done"
    before = snapshot(run_dir)
    time.sleep(0.05)  # so that a rewrite would show in the mtimes
    again = ok(train_main(args))
    assert snapshot(run_dir) == before
    assert "already finished" in again.stdout
    stored = summary(run_dir)
    assert f"completed after {stored['steps']} steps" in again.stdout and "test  accuracy" in again.stdout
    assert first.stdout.count("accuracy") > 0 and again.stderr == ""


def test_changed_training_key_gets_a_new_directory_unless_named(tmp_path, train_main):
    ok(train_main(DIGITS + SHORT_EPOCH))
    runs = tmp_path / "runs"
    assert (runs / "digits" / "summary.json").is_file()
    changed = ok(train_main(DIGITS + SHORT_EPOCH + ["optim.lr=0.02"]))
    assert (runs / "digits-2" / "summary.json").is_file()
    notes = [line for line in changed.stdout.splitlines() if "digits-2" in line and "other training keys" in line]
    assert len(notes) == 1, changed.stdout
    before = snapshot(runs / "digits")
    refused = train_main(DIGITS + SHORT_EPOCH + ["optim.lr=0.03", "run.name=digits"])
    assert refused.returncode == 2
    line = one_error_line(refused.stderr)
    assert "optim.lr" in line, line
    assert snapshot(runs / "digits") == before, "a refused run must not change the run directory"


@pytest.mark.slow
def test_a_run_directory_in_use_is_locked_and_a_stale_lock_is_taken_over(tmp_path):
    args = [PYTHON, str(REPO / "runner/train.py"), *DIGITS, "run.name=locked", "log.every_steps=1",
            "checkpoint.every_steps=5", f"run.root={tmp_path / 'runs'}"]
    run_dir = tmp_path / "runs" / "locked"
    holder = Background(args + ["train.epochs=100000"], tmp_path)  # far longer than the test
    try:
        wait_for_train_record(run_dir, holder)
        second = subprocess.run(args + ["train.epochs=1"], cwd=REPO, env=clean_env(tmp_path), capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        line = one_error_line(second.stderr)
        assert str(holder.proc.pid) in line and socket.gethostname() in line, line
        assert "run " not in second.stdout, "the second launch must stop before it starts training"
        holder.proc.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        holder.stop()
    assert (run_dir / "run.lock").exists(), "a SIGKILLed holder leaves its lock behind"
    taken_over = ok(subprocess.run(args + ["train.epochs=1"], cwd=REPO, env=clean_env(tmp_path),
                                   capture_output=True, text=True, timeout=300))
    assert "resumed from" in taken_over.stdout or "completed" in taken_over.stdout
    assert not (run_dir / "run.lock").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, train_main):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = tmp_path / "runs" / "orphan"
    run_dir.mkdir(parents=True)
    (run_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                  "slurm_job": None, "since": "earlier"}))
    ok(train_main(DIGITS + SHORT_EPOCH + ["run.name=orphan"]))
    assert (run_dir / "summary.json").is_file() and not (run_dir / "run.lock").exists()


def test_changed_training_keys_are_listed_and_epochs_may_change(reference, tmp_path, train_main):
    run_dir = tmp_path / "runs" / "ref"
    shutil.copytree(reference, run_dir)
    bad = train_main(COMMON + ["run.name=ref", "optim.lr=0.5", "train.seed=3"])
    assert bad.returncode == 2
    line = bad.stderr.strip()
    assert line.count("\n") == 0 and "optim.lr" in line and "train.seed" in line, line
    longer = ok(train_main(COMMON + ["run.name=ref", "train.epochs=3"]))
    assert "resumed from" in longer.stdout
    assert json.loads((run_dir / "summary.json").read_text())["epochs_completed"] == 3


def test_resume_none_refuses_to_overwrite_unless_told(reference, tmp_path, train_main):
    run_dir = tmp_path / "runs" / "ref"
    shutil.copytree(reference, run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    refused = train_main(COMMON + ["run.name=ref", "resume=none"])
    assert refused.returncode == 2 and "already holds checkpoints" in refused.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    ok(train_main(COMMON + ["run.name=ref", "resume=none", "run.overwrite=true", "checkpoint.keep_last=1"]))
    assert len(list((run_dir / "checkpoints").glob("step_*"))) <= 2  # last, plus best if different


# The lock on its own: RunLock in this process, a real second process as the other holder.

HOLD_LOCK = """
import sys
from pathlib import Path
from runner.rundir import RunLock

RunLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
sys.stdin.read()  # hold it until the test closes stdin or kills this process
"""


def write_lock(run_dir: Path, body: str, age_s: float = 0) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.lock"
    path.write_text(body)
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_run_lock_acquire_writes_the_holder_and_release_removes_it(tmp_path):
    run_dir = tmp_path / "runs" / "fresh"
    lock = RunLock(run_dir)
    lock.acquire()
    holder = json.loads((run_dir / "run.lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["since"]
    lock.release()
    assert not (run_dir / "run.lock").exists()
    assert not run_dir.exists(), "a lock on a directory it created, released with nothing written, leaves nothing"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("kept")
    kept = RunLock(run_dir)
    kept.acquire()
    kept.release()
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_run_lock_held_by_a_live_process_is_refused_naming_it_until_that_process_dies(tmp_path):
    run_dir = tmp_path / "runs" / "held"
    holder = subprocess.Popen([PYTHON, "-c", HOLD_LOCK, str(run_dir)], cwd=REPO, env=clean_env(tmp_path),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as refused:
            RunLock(run_dir).acquire()
        message = str(refused.value)
        assert f"in use by pid {holder.pid} on host {socket.gethostname()}" in message, message
        assert json.loads((run_dir / "run.lock").read_text())["pid"] == holder.pid, "a refusal must not touch it"
    finally:
        holder.kill()
        holder.wait(30)
    assert holder.returncode == -signal.SIGKILL and (run_dir / "run.lock").exists(), "SIGKILL leaves the lock"
    lock = RunLock(run_dir)
    lock.acquire()  # its holder is gone: taken over
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_run_lock_of_a_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = tmp_path / "orphan"
    write_lock(run_dir, json.dumps({"host": socket.gethostname(), "pid": dead.pid, "slurm_job": None,
                                    "since": "earlier"}))
    lock = RunLock(run_dir)
    lock.acquire()
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_run_lock_on_another_host_is_refused(tmp_path):
    run_dir = tmp_path / "shared"
    write_lock(run_dir, json.dumps({"host": "node-elsewhere", "pid": 1, "slurm_job": None, "since": "earlier"}),
               age_s=3600)
    with pytest.raises(UserError, match="in use by pid 1 on host node-elsewhere"):
        RunLock(run_dir).acquire()


def test_run_lock_of_an_earlier_run_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    """A requeued job may start on another node: its own earlier lock is its own."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    run_dir = tmp_path / "requeued"
    write_lock(run_dir, json.dumps({"host": "node-elsewhere", "pid": 1, "slurm_job": "4242", "since": "earlier"}))
    lock = RunLock(run_dir)
    lock.acquire()
    assert json.loads((run_dir / "run.lock").read_text())["slurm_job"] == "4242"
    lock.release()


@pytest.mark.parametrize("body", ["", "{", "[1, 2]", "null", "{}"], ids=["empty", "cut short", "a list", "null",
                                                                    "an empty object"])
def test_run_lock_empty_or_garbled(tmp_path, body):
    """A lock is written whole (to a file of its own, then linked into place), so an empty or garbled one
    was never another launch writing it: fresh or old, it is taken over."""
    for name, age in (("fresh", 0), ("stale", 60)):
        run_dir = tmp_path / name
        write_lock(run_dir, body, age_s=age)
        lock = RunLock(run_dir)
        lock.acquire()
        assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
        lock.release()
        assert not (run_dir / "run.lock").exists()


def test_a_run_that_writes_nothing_has_a_disabled_run_directory(tmp_path):
    """fast_dev_run: the RunDir says so itself, writes nothing and its checkpointer is never due."""
    cfg = Config(run=RunConfig(root=str(tmp_path / "runs")))
    run_dir = RunDir.resolve(cfg, "digits", None, writes=False)
    assert not run_dir.enabled and str(run_dir) == "(fast_dev_run: nothing is written)"
    assert run_dir.metrics_file is None and run_dir.checkpoints is None
    run_dir.claim("auto", False, False)
    run_dir.write("summary.json", "{}")
    run_dir.release()
    no_ema = EmaWeights(None, 0.0, None)
    checkpoints = Checkpointer(None, run_dir, CheckpointConfig(every_steps=1, every_epochs=1), print, no_ema)
    assert not any(checkpoints.due(step, 1, True) for step in range(1, 5))
    assert checkpoints.resume("auto") is None and checkpoints.complete() == []
    assert not (tmp_path / "runs").exists()
    written = RunDir.resolve(cfg, "digits", None, writes=True)
    written.claim("auto", False, False)
    written.write("summary.json", "{}")
    assert (tmp_path / "runs" / "digits" / "summary.json").read_text() == "{}"
    assert Checkpointer(None, written, CheckpointConfig(every_steps=2, every_epochs=0), print, no_ema).due(4, 0, False)
    written.release()


def test_a_run_written_before_a_key_existed_is_the_same_experiment(tmp_path, train_main):
    """A fingerprint key the runner gained later (here train.ema_decay and optim.backbone_lr_factor) is absent
    from an older run's config.yaml and checkpoint manifest: it counts as its default, so the run continues in
    its own directory instead of being refused or moved to <name>-2."""
    args = DIGITS + ["train.epochs=2", "train.limit_train_steps=4"]
    ok(train_main(args + ["train.max_steps=2"]))
    run_dir = tmp_path / "runs" / "digits"
    newer = ("train.ema_decay", "optim.backbone_lr_factor")
    config = (run_dir / "config.yaml").read_text().splitlines()
    (run_dir / "config.yaml").write_text("".join(line + "\n" for line in config
                                                 if line.strip().split(":")[0] not in ("ema_decay", "backbone_lr_factor")))
    for manifest in (run_dir / "checkpoints").glob("step_*/manifest.json"):
        written = json.loads(manifest.read_text())
        written["fingerprint"] = {k: v for k, v in written["fingerprint"].items() if k not in newer}
        manifest.write_text(json.dumps(written))
    continued = ok(train_main(args))
    assert "resumed from" in continued.stdout and "other training keys" not in continued.stdout
    assert not (tmp_path / "runs" / "digits-2").exists() and summary(run_dir)["steps"] == 8
