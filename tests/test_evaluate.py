"""runner/evaluate.py: evaluating a run's checkpoints by run directory and by handle, as a process and in
process, after a training run that evaluates val during training and test once at the end.
"""
from __future__ import annotations

import subprocess

import pytest

from runner.evaluate import main as evaluate_main

from tests.util import DIGITS, PYTHON, REPO, clean_env, ok, read_jsonl, reset_accelerate, summary


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

