"""How a start is decided: the launcher's variables are checked before any process group is tried, and
everything about the run directory is decided by the main rank under its lock (whether the run has already
finished, what the run's header says about it), with a lock that is whole or absent, so a refused or failed
start leaves nothing that blocks the next."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.util import PYTHON, REPO, clean_env, error_line, free_port, ok, read_jsonl, run_train

DIGITS = ["--config", "digits", "log.trackers=[]", "log.plot=false"]
SHORT = ["train.epochs=1", "train.limit_train_steps=4"]


@pytest.mark.parametrize("bad, named", [({"WORLD_SIZE": "0"}, "WORLD_SIZE"), ({"WORLD_SIZE": "abc"}, "WORLD_SIZE"),
                                        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK"),
                                        ({"LOCAL_RANK": "-1"}, "LOCAL_RANK"), ({"MASTER_PORT": "0"}, "MASTER_PORT"),
                                        ({"MASTER_PORT": "70000"}, "MASTER_PORT")],
                         ids=["world0", "world_abc", "rank_ge_world", "local_rank_neg", "port0", "port70000"])
def test_launcher_variables_that_make_no_sense_are_one_line(tmp_path, bad, named):
    """Before: ZeroDivisionError, ValueError, or a 40 s wait and a DistNetworkError. Now one line naming the
    variable, exit 2, before any process group is tried; nothing is written."""
    env = clean_env(tmp_path, RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, LOCAL_WORLD_SIZE=1, MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=free_port())
    env.update(bad)
    started = time.monotonic()
    result = run_train(DIGITS + SHORT + ["run.name=env", "dist.timeout_s=30"], tmp_path, env=env, timeout=60)
    line = error_line(result)
    assert f"{named}={bad[named]!r}" in line, line
    assert time.monotonic() - started < 20
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content", ["", '{"host": "'], ids=["empty", "cut_short"])
def test_a_lock_that_names_nobody_is_stale(tmp_path, content):
    """A run.lock that is empty or not JSON (its writer died; a lock is now linked into place whole) was
    refused as 'in use by pid ? on host ?' until it was 10 s old. It is taken over at once."""
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    (run_dir / "run.lock").write_text(content)
    future = time.time() + 600  # as fresh as can be, however long this start takes to reach the lock
    os.utime(run_dir / "run.lock", (future, future))
    result = ok(run_train(DIGITS + SHORT + ["run.name=x"], tmp_path), clean=True)
    assert "in use" not in result.stdout + result.stderr
    assert (run_dir / "summary.json").is_file() and not (run_dir / "run.lock").exists()


@pytest.mark.slow
def test_a_start_on_a_full_disk_leaves_nothing_behind(small_disk, tmp_path):
    """With 0 to 16 KiB left, a start fails at the lock, at config.yaml, or as the TensorBoard writer starts:
    each time one line and exit 2 (no thread's traceback after it), no run.lock and no temporary file left,
    so that once there is space again the next start runs."""
    args = ["--config", "digits", "log.plot=false", *SHORT, "run.name=full", f"run.root={small_disk}"]
    for leave in (0, 4096, 8192, 12288, 16384):
        stat = os.statvfs(small_disk)
        (small_disk / "filler").write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
        line = error_line(run_train(args, tmp_path))
        assert "No space left on device" in line, (leave, line)
        left = sorted(str(p.relative_to(small_disk)) for p in small_disk.rglob("*") if p.name != "filler")
        assert not [p for p in left if p.endswith(("run.lock", ".tmp"))], (leave, left)
        (small_disk / "filler").unlink()
    result = ok(run_train(args, tmp_path), clean=True)
    assert "in use" not in result.stderr and (small_disk / "full" / "summary.json").is_file()


def test_a_launch_that_waited_while_the_same_run_finished_does_not_run_it_again(tmp_path):
    """The finished-run check and the lock were two steps: a launch that checked while the run was still
    going, then took the lock once it had finished, resumed from the final checkpoint, evaluated again and
    rewrote summary.json. Here the run "finishes" (summary.json back, lock released) while the second launch
    imports torch. It must report the run as finished (exit 0) or as in use (exit 2), and change nothing."""
    args = DIGITS + SHORT + ["run.name=race"]
    ok(run_train(args, tmp_path), clean=True)
    run_dir = tmp_path / "runs" / "race"
    summary, aside = run_dir / "summary.json", tmp_path / "summary.json"
    written = summary.read_bytes(), summary.stat().st_mtime_ns
    os.replace(summary, aside)  # as while the first launch was still running
    holder = subprocess.Popen(["sleep", "120"])
    (run_dir / "run.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid}))
    second = subprocess.Popen([PYTHON, str(REPO / "runner/train.py"), *args, f"run.root={tmp_path / 'runs'}"],
                              cwd=REPO, env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.time() + 120
        while "libtorch" not in Path(f"/proc/{second.pid}/maps").read_text():
            assert second.poll() is None and time.time() < deadline, second.communicate()
            time.sleep(0.01)
        os.replace(aside, summary)  # the first launch finishes and lets go of its lock
        (run_dir / "run.lock").unlink()
        holder.kill()
        out, err = second.communicate(timeout=300)
    finally:
        holder.kill()
        second.kill()
    assert "Traceback" not in err, err[-3000:]
    if second.returncode == 2:
        assert "in use" in err, err
    else:
        assert second.returncode == 0 and "already finished" in out, f"exit {second.returncode}:\n{out}{err}"
    assert (summary.read_bytes(), summary.stat().st_mtime_ns) == written
    assert not (run_dir / "run.lock").exists()


def test_more_epochs_after_an_ended_cosine_schedule_say_it_is_replanned(tmp_path):
    """A completed cosine run ended at learning rate 0; more epochs re-plan the schedule over the new length
    (the learning rate rises again). The header says so in one line, with how to get one schedule."""
    args = DIGITS + SHORT + ["run.name=cos", "schedule.name=cosine", "log.every_steps=1"]
    ok(run_train(args, tmp_path), clean=True)
    continued = ok(run_train(args + ["train.epochs=2"], tmp_path), clean=True)
    notes = [line for line in continued.stdout.splitlines() if "schedule.name=cosine" in line]
    assert len(notes) == 1 and "re-plans it over 2 epochs" in notes[0] and "run.name" in notes[0], continued.stdout
    lr = {r["step"]: r["lr"] for r in read_jsonl(tmp_path / "runs" / "cos" / "metrics.jsonl") if r["split"] == "train"}
    assert lr[4] == 0 and lr[5] > 0, lr


def test_a_fast_dev_run_names_no_run_directory_or_checkpoint(tmp_path):
    """train.fast_dev_run writes nothing, so its header and summary name no run directory and no checkpoint."""
    result = ok(run_train(DIGITS + ["train.fast_dev_run=2"], tmp_path), clean=True)
    assert str(tmp_path / "runs") not in result.stdout and "step_0" not in result.stdout, result.stdout
    assert "nothing is written" in result.stdout and not (tmp_path / "runs").exists()
