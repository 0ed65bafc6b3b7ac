"""The training loop (runner/loop.py): gradient accumulation, a non-finite loss, and a train.max_steps stop
that continues on the uninterrupted trajectory.
"""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from tests.util import QUIET, RESUMABLE, STOP_AT, final_weights, last_weights, max_relative_difference, ok, summary


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


def test_non_finite_loss_stops_without_saving(tmp_path, train_main):
    result = train_main(["--config", "digits", "run.name=nan", "optim.lr=1e38", "log.trackers=[]",
                         "checkpoint.every_steps=1"])
    assert result.returncode == 2
    assert "non-finite training loss at step" in result.stderr
    run_dir = tmp_path / "runs" / "nan"
    for checkpoint in (run_dir / "checkpoints").glob("step_*"):
        weights = load_file(checkpoint / "model.safetensors")
        assert all(v.isfinite().all() for v in weights.values()), f"{checkpoint} holds non-finite weights"


def test_gradient_accumulation_matches_the_larger_batch(train_main, tmp_path):
    """micro 8 x accumulation 4 == micro 32 == global 32 from micro 8: the same final weights."""
    common = ["--config", "digits", "train.epochs=1", "train.limit_train_steps=6", *QUIET]
    variants = {
        "big": ["train.micro_batch_size=32"],
        "accumulated": ["train.micro_batch_size=8", "train.gradient_accumulation_steps=4"],
        "global": ["train.micro_batch_size=8", "train.global_batch_size=32"],
        "small": ["train.micro_batch_size=8", "train.global_batch_size=8"],  # a control: 8 per step differs
    }
    weights = {}
    for name, extra in variants.items():
        result = ok(train_main(common + extra, run_root=tmp_path / name))
        assert summary(result.run_root / "digits")["steps"] == 6
        weights[name] = final_weights(result.run_root / "digits")
    for name in ("accumulated", "global"):
        assert weights[name].keys() == weights["big"].keys()
        for key in weights["big"]:
            torch.testing.assert_close(weights[name][key], weights["big"][key], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(weights["small"][k], weights["big"][k], atol=1e-3) for k in weights["big"])

