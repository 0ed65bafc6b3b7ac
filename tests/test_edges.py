"""The same run on any scale and across every restart: world sizes, micro batches, branches, re-runs, new
run names, held-out validation, handles, continuous time, user models and the run lock."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from runner import config as configlib
from runner.plan import Config
from runner.evaluate import main as evaluate_main
from tests.conftest import reset_accelerate
from tests.dist_helpers import Background
from tests.util import BIN, PYTHON, REPO, clean_env, read_jsonl, run_train, summary, torchrun

QUIET = ["log.trackers=[]", "log.plot=false"]
DIGITS = ["--config", "digits", *QUIET]
SHORT = ["train.epochs=1", "train.limit_train_steps=8"]
# Two epochs of 6 steps at global batch 64: resumable at step K = 5 (mid-epoch 1) on any world size.
RESUMABLE = DIGITS + ["train.epochs=2", "train.limit_train_steps=6", "train.global_batch_size=64"]
STOP_AT = 5


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def last_weights(run_dir: Path) -> dict:
    return load_file(Path(run_dir) / "checkpoints" / "last" / "model.safetensors")


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)


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


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


# 1. Presets pin the global batch and hold out val: the same final weights on 1, 2 and 4 processes.

@pytest.mark.parametrize("preset", configlib.presets())
def test_every_preset_pins_the_global_batch_and_holds_out_val(preset):
    cfg = configlib.load(Config, preset, [])
    assert cfg.train.global_batch_size > 0, f"{preset} does not pin train.global_batch_size"
    assert cfg.train.micro_batch_size == 0, f"{preset} pins the micro batch: it would change with the world"
    assert cfg.train.gradient_accumulation_steps == 0
    assert cfg.data.val_fraction > 0, f"{preset} holds out no validation split"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_digits_preset_ends_the_same_on_any_world_size(tmp_path, train_main, world):
    ok(train_main(DIGITS + SHORT + ["run.name=w1"]))
    ok(run_train(DIGITS + SHORT + [f"run.name=w{world}"], tmp_path, launcher=torchrun(world)))
    run_dir = tmp_path / "runs" / f"w{world}"
    difference = max_relative_difference(last_weights(run_dir), last_weights(tmp_path / "runs" / "w1"))
    print(f"digits preset, 1 vs {world} processes: max relative difference {difference:.3g}")
    assert difference <= 1e-5
    assert summary(run_dir)["world_size"] == world and summary(run_dir)["steps"] == 8


# 2. Resume on another world size or micro batch, same global batch: the same trajectory.

def run_part(train_main, tmp_path, processes: int, args: list[str]):
    """One process in-process (fast), several under torchrun."""
    if processes == 1:
        return ok(train_main(args))
    return ok(run_train(args, tmp_path, launcher=torchrun(processes)))


@pytest.mark.parametrize("case, first, then", [
    pytest.param("2 -> 1 processes", (2, 32), (1, 32), marks=pytest.mark.slow),
    pytest.param("1 -> 2 processes", (1, 32), (2, 32), marks=pytest.mark.slow),
    ("micro 32 -> 16", (1, 32), (1, 16)),
])
def test_resume_on_another_world_or_micro_batch_continues_the_trajectory(tmp_path, train_main, case, first, then):
    """(processes, micro batch): the first launch leaves a checkpoint at STOP_AT, the second resumes from it."""
    run_part(train_main, tmp_path, 1, RESUMABLE + ["train.micro_batch_size=32", "run.name=whole"])
    args = RESUMABLE + ["run.name=parts", "checkpoint.keep_last=10"]
    run_part(train_main, tmp_path, first[0], args + [f"train.micro_batch_size={first[1]}",
                                                     f"checkpoint.every_steps={STOP_AT}"])
    checkpoint = tmp_path / "runs" / "parts" / "checkpoints" / f"step_{STOP_AT:08d}"
    resumed = run_part(train_main, tmp_path, then[0], args + [f"train.micro_batch_size={then[1]}",
                                                              f"resume={checkpoint}"])
    assert f"resumed from {checkpoint}" in resumed.stdout, resumed.stdout[-3000:]
    run_dir = tmp_path / "runs" / "parts"
    assert summary(run_dir)["steps"] == 12 and summary(run_dir)["segments"] == 2
    difference = max_relative_difference(last_weights(run_dir), last_weights(tmp_path / "runs" / "whole"))
    print(f"resume {case}: max relative difference to the uninterrupted run {difference:.3g}")
    assert difference <= 1e-5


def test_a_max_steps_stop_then_continue_is_the_uninterrupted_trajectory(tmp_path, train_main):
    """train.max_steps may change on resume: stopping at K and continuing must not bend the schedule."""
    ok(train_main(RESUMABLE + ["run.name=whole"]))
    ok(train_main(RESUMABLE + ["run.name=parts", f"train.max_steps={STOP_AT}"]))
    assert (tmp_path / "runs" / "parts" / "checkpoints" / f"step_{STOP_AT:08d}").is_dir(), "no checkpoint at K"
    ok(train_main(RESUMABLE + ["run.name=parts"]))
    runs = tmp_path / "runs"
    difference = max_relative_difference(last_weights(runs / "parts"), last_weights(runs / "whole"))
    print(f"max_steps={STOP_AT} stop, then continue: max relative difference {difference:.3g}")
    assert difference <= 1e-5


# 3. Resuming from an older checkpoint branches: the later ones are moved aside, never resumed.

def test_resume_from_an_older_checkpoint_moves_later_ones_aside(tmp_path, train_main):
    args = DIGITS + SHORT + ["run.name=branchy", "checkpoint.every_steps=2", "checkpoint.keep_last=100"]
    ok(train_main(args))
    ckpts = tmp_path / "runs" / "branchy" / "checkpoints"
    old = ckpts / "step_00000004"
    branched = ok(train_main(args + [f"resume={old}", "train.max_steps=5"]))
    assert f"resumed from {old}" in branched.stdout
    aside = list(ckpts.glob("branched-*"))
    assert len(aside) == 1, sorted(p.name for p in ckpts.iterdir())
    assert sorted(p.name for p in aside[0].iterdir()) == ["step_00000006", "step_00000008"]
    assert all((p / "manifest.json").is_file() for p in aside[0].iterdir()), "moved checkpoints must be kept whole"
    assert (ckpts / "last").resolve() == (ckpts / "step_00000005").resolve()
    continued = ok(train_main(args))
    assert f"resumed from {ckpts / 'step_00000005'}" in continued.stdout, continued.stdout
    assert sorted(p.name for p in aside[0].iterdir()) == ["step_00000006", "step_00000008"]


# 4. A finished run, run again with the same config, changes nothing.

def test_running_a_finished_run_again_changes_nothing(tmp_path, train_main):
    args = DIGITS + SHORT + ["run.name=done"]
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


# 5. Changed training keys: a new default-named directory, or a refusal for an explicit run.name.

def test_changed_training_key_gets_a_new_directory_unless_named(tmp_path, train_main):
    ok(train_main(DIGITS + SHORT))
    runs = tmp_path / "runs"
    assert (runs / "digits" / "summary.json").is_file()
    changed = ok(train_main(DIGITS + SHORT + ["optim.lr=0.02"]))
    assert (runs / "digits-2" / "summary.json").is_file()
    notes = [line for line in changed.stdout.splitlines() if "digits-2" in line and "other training keys" in line]
    assert len(notes) == 1, changed.stdout
    before = snapshot(runs / "digits")
    refused = train_main(DIGITS + SHORT + ["optim.lr=0.03", "run.name=digits"])
    assert refused.returncode == 2
    line = one_error_line(refused.stderr)
    assert "optim.lr" in line, line
    assert snapshot(runs / "digits") == before, "a refused run must not change the run directory"


# 6. and 7. Val during training, test once; handles, evaluate, resume=last.

@pytest.mark.slow
def test_val_during_training_test_at_the_end_and_handles_work(tmp_path, train_main, capsys):
    args = DIGITS + ["train.epochs=2", "train.limit_train_steps=4", "run.name=handles"]
    ok(train_main(args))
    run_dir = tmp_path / "runs" / "handles"
    splits = [r["split"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert splits.count("val") == 2 and "test" not in splits and splits.count("final_test") == 1, splits
    for handle in ("best", "last"):
        path = run_dir / "checkpoints" / handle
        assert path.is_symlink() and (path / "manifest.json").is_file(), handle
    assert (run_dir / "checkpoints" / "last").resolve().name == "step_00000008"
    by_run = subprocess.run([PYTHON, str(REPO / "runner/evaluate.py"), "--checkpoint", str(run_dir)], cwd=REPO,
                            env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert by_run.returncode == 0 and "accuracy" in by_run.stdout, by_run.stderr[-3000:]
    reset_accelerate()
    try:
        assert evaluate_main(["--checkpoint", str(run_dir / "checkpoints" / "best")]) == 0
    finally:
        reset_accelerate()
    assert "accuracy" in capsys.readouterr().out
    longer = ok(train_main(args + ["train.epochs=3", f"resume={run_dir / 'checkpoints' / 'last'}"]))
    assert "resumed from" in longer.stdout and "step_00000008" in longer.stdout
    assert summary(run_dir)["steps"] == 12


# 8. Time is continuous across resumes.

def assert_time_is_continuous(run_dir: Path) -> None:
    stored = summary(run_dir)
    assert stored["segments"] == 2, stored
    assert stored["wall_seconds"] >= stored["segment_wall_seconds"], stored
    assert stored["train_seconds"] >= stored["segment_train_seconds"], stored
    times = [r["time"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert times == sorted(times), f"metrics.jsonl time goes backwards: {times}"


def test_time_is_continuous_after_a_max_steps_stop(tmp_path, train_main):
    args = DIGITS + SHORT + ["run.name=timed", "log.every_steps=1"]
    ok(train_main(args + ["train.max_steps=4"]))
    ok(train_main(args))
    assert_time_is_continuous(tmp_path / "runs" / "timed")


def wait_for_train_record(run_dir: Path, launch: Background, timeout: float = 240) -> None:
    def training():
        path = run_dir / "metrics.jsonl"
        return path.exists() and any(r["split"] == "train" for r in read_jsonl(path))
    launch.wait_for(training, timeout, "a training step")


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


# 9. A user's model from the current directory, by both entry points.

MYNET = '''
from torch import nn


class MyNet(nn.Module):
    def __init__(self, in_shape, num_classes, width=8):
        super().__init__()
        c, h, w = in_shape
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(x)
'''


@pytest.fixture
def user_dir(tmp_path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "mynet.py").write_text(MYNET)
    return folder


USER_RUN = DIGITS + ["model.name=mynet:MyNet", "train.epochs=1", "train.limit_train_steps=2"]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["script", "console script"])
def test_user_model_imports_from_the_current_directory(user_dir, tmp_path, entry):
    program = [PYTHON, str(REPO / "runner/train.py")] if entry == "script" else [str(BIN / "runner-train")]
    result = subprocess.run(program + USER_RUN + ["run.name=mine", f"run.root={tmp_path / 'runs'}"], cwd=user_dir,
                            env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    ok(result)
    saved = yaml.safe_load((tmp_path / "runs" / "mine" / "config.yaml").read_text())
    assert saved["model"]["kwargs"] == {}, "the preset's model.kwargs must not reach another model"


def test_unknown_user_model_kwargs_are_refused_in_one_line(user_dir, train_main, monkeypatch):
    monkeypatch.chdir(user_dir)
    refused = train_main(USER_RUN + ["model.kwargs={depth: 3}", "run.name=mine"])
    assert refused.returncode == 2
    assert "depth" in one_error_line(refused.stderr)


# 10. The run lock.

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
    ok(train_main(DIGITS + SHORT + ["run.name=orphan"]))
    assert (run_dir / "summary.json").is_file() and not (run_dir / "run.lock").exists()
