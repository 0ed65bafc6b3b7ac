"""Single-process runs end to end: every preset as shipped, the digits preset's accuracy, and the debug
modes (fast_dev_run, overfit_batches).
"""
from __future__ import annotations

import math

import pytest
import yaml

from runner.config import load_raw, presets

from tests.util import QUIET, RUN_FILES, ok, read_jsonl, summary


def preset_data_root(name: str, request) -> list[str]:
    data = load_raw(name).get("data", {}).get("name", "digits")
    fixture = {"mnist": "mnist_root", "fashion_mnist": "fashion_mnist_root", "cifar10": "cifar_root",
               "folder": "folder_root"}.get(data)
    return [f"data.root={request.getfixturevalue(fixture)}"] if fixture else []


@pytest.mark.parametrize("preset", presets())
def test_preset_trains_one_short_epoch(train_main, request, preset):
    """Each preset as shipped (precision included: cifar10_fast is bf16), on tiny data, small batches."""
    steps, eval_batch = 2, 16
    result = ok(train_main(["--config", preset, *preset_data_root(preset, request), "train.epochs=1",
                            f"train.limit_train_steps={steps}", "train.global_batch_size=8",
                            f"eval.batch_size={eval_batch}", "train.limit_eval_batches=1", *QUIET]))
    run_dir = result.run_root / preset
    assert all((run_dir / f).is_file() for f in RUN_FILES), sorted(p.name for p in run_dir.iterdir())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    shipped = load_raw(preset)
    for section in ("data", "model", "optim"):
        for key, value in shipped.get(section, {}).items():
            if key != "root":
                assert saved[section][key] == value, (section, key)
    assert saved["train"]["mixed_precision"] == shipped["train"].get("mixed_precision", "no")
    s = summary(run_dir)
    assert s["stopped"] == "completed" and s["steps"] == steps and s["epochs_completed"] == 1
    test = s["final"]["test"]
    assert test["samples"] == eval_batch and math.isfinite(test["loss"]) and 0 <= test["accuracy"] <= 1
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"][-1] == steps
    assert any(r["split"] == "final_test" for r in records)


@pytest.mark.slow
def test_digits_preset_reaches_90_percent(train_main):
    result = ok(train_main(["--config", "digits", *QUIET]))
    s = summary(result.run_root / "digits")
    epochs = load_raw("digits")["train"]["epochs"]
    assert s["stopped"] == "completed" and s["epochs_completed"] == epochs
    assert s["final"]["test"]["samples"] == 1797 // 5
    assert s["final"]["test"]["accuracy"] >= 0.90, s["final"]["test"]


def test_fast_dev_run_writes_no_run_directory(train_main):
    steps, eval_batch = 2, 16
    result = ok(train_main(["--config", "digits", f"train.fast_dev_run={steps}",
                            f"eval.batch_size={eval_batch}"]))  # trackers and plot left on
    assert not result.run_root.exists(), list(result.run_root.rglob("*"))
    assert f"completed after {steps} steps" in result.stdout
    assert f"({steps * eval_batch} samples)" in result.stdout  # N eval batches only


def test_overfit_batches_fits_its_subset(train_main):
    """One global batch, trained on and evaluated on: a working model and loop get it (nearly) all right."""
    batch = 32
    result = ok(train_main(["--config", "digits", "train.overfit_batches=1", f"train.micro_batch_size={batch}",
                            "train.epochs=25", *QUIET]))
    s = summary(result.run_root / "digits")
    assert s["steps"] == 25  # one step per epoch: the subset is one global batch
    overfit = s["final"]["overfit"]
    assert overfit["samples"] == batch
    assert overfit["accuracy"] >= 0.97, overfit

