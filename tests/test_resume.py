"""Checkpoints and exact resume: a stopped and resumed run ends bit-identical to an uninterrupted one."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from tests.util import PYTHON, REPO, clean_env, read_jsonl, run_train, torchrun

# SimpleCNN on digits with crop+flip, accumulation 2 and a cosine schedule: every piece of state matters.
COMMON = ["--config", "digits", "model.name=simple_cnn", "model.kwargs={width: 4, hidden: 16}",
          "train.epochs=2", "train.micro_batch_size=16", "train.global_batch_size=64", "data.crop_padding=2",
          "data.flip=true", "schedule.name=cosine", "schedule.warmup_steps=3", "log.trackers=[]",
          "log.plot=false", "train.limit_train_steps=6"]


def final_weights(run_dir: Path) -> dict:
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return load_file(last / "model.safetensors")


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), f"{key} differs"


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run that keeps a checkpoint after every optimizer step."""
    tmp = tmp_path_factory.mktemp("reference")
    ok(run_train(COMMON + ["run.name=ref", "checkpoint.every_steps=1", "checkpoint.keep_last=100"], tmp))
    return tmp / "runs" / "ref"


@pytest.mark.parametrize("step, where", [(6, "first step of epoch 2 (after the epoch-1 boundary)"),
                                         (5, "last step of epoch 1"), (9, "middle of epoch 2")])
def test_resume_from_any_step_is_bit_identical(reference, tmp_path, train_main, step, where):
    checkpoint = reference / "checkpoints" / f"step_{step:08d}"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["global_step"] == step
    result = ok(train_main(COMMON + ["run.name=resumed", f"resume={checkpoint}"]))
    assert f"resumed from {checkpoint}" in result.stdout
    assert_identical(final_weights(reference), final_weights(tmp_path / "runs" / "resumed"))


def start(args, tmp_path, env=None):
    cmd = [PYTHON, str(REPO / "runner/train.py")] + args + [f"run.root={tmp_path / 'runs'}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env or clean_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_step(run_dir: Path, step: int, proc, timeout=120) -> None:
    """Wait until the run has logged optimizer step `step` (metrics.jsonl is written every step)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r["step"] >= step for r in read_jsonl(path) if r["split"] == "train"):
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


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


def test_corrupt_newest_checkpoint_falls_back_and_says_so(reference, tmp_path, train_main):
    run_dir = tmp_path / "runs" / "ref"
    shutil.copytree(reference, run_dir)
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:100])
    # A half-written checkpoint from a kill -9: never picked.
    shutil.copytree(newest.parent / "step_00000011", newest.parent / ".tmp-step_00000013")
    result = ok(train_main(COMMON + ["run.name=ref", "train.epochs=3"]))
    assert f"{newest} is corrupt" in result.stdout + result.stderr
    assert "resumed from" in result.stdout and "step_00000011" in result.stdout


def test_explicit_bad_checkpoints_give_one_line(reference, tmp_path, train_main):
    broken = tmp_path / "broken"
    shutil.copytree(reference / "checkpoints" / "step_00000004", broken)
    (broken / "optimizer.bin").write_bytes(b"\0" * 10)
    cases = {str(tmp_path / "missing"): "does not exist", str(tmp_path): "not a checkpoint",
             str(broken): "corrupt"}
    for path, expected in cases.items():
        result = train_main(COMMON + ["run.name=x", f"resume={path}"])
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_non_finite_loss_stops_without_saving(tmp_path, train_main):
    result = train_main(["--config", "digits", "run.name=nan", "optim.lr=1e38", "log.trackers=[]",
                         "checkpoint.every_steps=1"])
    assert result.returncode == 2
    assert "non-finite training loss at step" in result.stderr
    run_dir = tmp_path / "runs" / "nan"
    for checkpoint in (run_dir / "checkpoints").glob("step_*"):
        weights = load_file(checkpoint / "model.safetensors")
        assert all(v.isfinite().all() for v in weights.values()), f"{checkpoint} holds non-finite weights"


@pytest.mark.slow
def test_kill_9_at_random_moments_never_loses_a_complete_checkpoint(reference, tmp_path):
    """Repeatedly SIGKILL a run (often mid-save, with a save every step); it always resumes and ends exact."""
    args = COMMON + ["run.name=killed", "checkpoint.every_steps=1", "log.every_steps=1"]
    run_dir = tmp_path / "runs" / "killed"
    delays = [0.3, 0.05, 0.6, 0.15, 0.45]
    for delay in delays:
        proc = start(args, tmp_path)
        try:
            wait_for_step(run_dir, 1, proc)
        except AssertionError:
            break  # finished already
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        complete = [p for p in (run_dir / "checkpoints").glob("step_*")]
        assert all((p / "manifest.json").exists() for p in complete)
    ok(run_train(args, tmp_path))
    assert_identical(final_weights(reference), final_weights(run_dir))
