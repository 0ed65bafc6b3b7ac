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

