"""Single-process training runs: every preset, accuracy, precision, accumulation, debug modes, user models
and what a run writes (console output, metrics.jsonl, summary.json)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from runner.config import load_raw, presets
from runner.data.splits import DataConfig, load_splits
from tests.conftest import QUIET
from tests.util import clean_env, read_jsonl, run_train, summary

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


def ok(result):
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """model.safetensors of the newest checkpoint."""
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return load_file(newest / "model.safetensors")


def digits_train_size() -> int:
    """The preset's training split (it holds out a validation split)."""
    return len(load_splits(DataConfig(**load_raw("digits")["data"]), seed=0).train)


# ---------------------------------------------------------------------------------------------- presets

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


# ---------------------------------------------------------------------------------------------- precision

def test_bf16_on_cpu(train_main, tmp_path):
    """bf16 autocast runs on the CPU: the run completes, and the numbers differ slightly from fp32."""
    args = ["--config", "digits", "train.epochs=1", "train.limit_train_steps=5", *QUIET]
    bf16 = ok(train_main(args + ["train.mixed_precision=bf16", "dist.allow_emulated_bf16=true"], run_root=tmp_path / "bf16"))
    fp32 = ok(train_main(args, run_root=tmp_path / "fp32"))
    assert "precision bf16" in bf16.stdout
    run_dir = bf16.run_root / "digits"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["mixed_precision"] == "bf16"
    assert math.isfinite(summary(run_dir)["final"]["test"]["loss"])
    low, full = final_weights(run_dir), final_weights(fp32.run_root / "digits")
    assert all(w.dtype == torch.float32 for w in low.values())  # master weights stay fp32
    diff = max((low[k] - full[k]).abs().max().item() for k in full)
    assert 0 < diff < 0.05, diff  # autocast really ran in bf16, and it still trained the same model


# ---------------------------------------------------------------------------------------------- accumulation

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


# ---------------------------------------------------------------------------------------------- debug modes

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


# ---------------------------------------------------------------------------------------------- user models

USER_MODEL = """
import json, os
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, in_shape, num_classes, hidden=8):
        super().__init__()
        with open(os.environ["TINYNET_LOG"], "a") as f:
            f.write(json.dumps({"in_shape": list(in_shape), "num_classes": num_classes, "hidden": hidden}) + "\\n")
        c, h, w = in_shape
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)
"""


def test_user_model_from_pythonpath(tmp_path):
    package = tmp_path / "usercode" / "mymodels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tiny.py").write_text(USER_MODEL)
    log = tmp_path / "constructed.jsonl"
    env = clean_env(tmp_path, PYTHONPATH=tmp_path / "usercode", TINYNET_LOG=log)
    hidden = 12
    result = ok(run_train(["--config", "digits", "model.name=mymodels.tiny:TinyNet",
                           f"model.kwargs={{hidden: {hidden}}}", "train.epochs=1", "train.limit_train_steps=3",
                           *QUIET], tmp_path, env=env))
    built = read_jsonl(log)
    assert built and all(b == {"in_shape": [1, 28, 28], "num_classes": 10, "hidden": hidden} for b in built)
    parameters = 784 * hidden + hidden + hidden * 10 + 10
    assert f"model mymodels.tiny:TinyNet: {parameters:,} parameters" in result.stdout
    s = summary(tmp_path / "runs" / "digits")
    assert s["steps"] == 3 and math.isfinite(s["final"]["test"]["loss"])


# ---------------------------------------------------------------------------------------------- what a run writes

@pytest.fixture(scope="module")
def digits_process(tmp_path_factory):
    """One real `runner/train.py --config digits train.epochs=1` process, stdout piped (not a terminal),
    with the default trackers and plot."""
    tmp = tmp_path_factory.mktemp("digits_process")
    result = run_train(["--config", "digits", "train.epochs=1"], tmp)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result, tmp / "runs" / "digits"


def test_piped_output_has_no_carriage_returns_or_ansi_escapes(digits_process):
    result, _ = digits_process
    steps = digits_train_size() // 32
    every = max(1, steps // 100)  # log.every_steps=0 (auto): about 100 points a run
    # progress comes as plain lines (not a bar) at every log.every_steps steps and the last step
    for step in list(range(every, steps + 1, every)) + [steps]:
        assert re.search(rf"^epoch 1/1 +step {step}/{steps} ", result.stdout, re.M), step
    for stream in (result.stdout, result.stderr):
        assert "\r" not in stream
        assert "\x1b" not in stream  # every ANSI escape sequence starts with ESC


def test_run_directory_files(digits_process):
    _, run_dir = digits_process
    assert all((run_dir / f).is_file() for f in RUN_FILES)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1 and saved["data"]["name"] == "digits"
    assert saved["train"]["global_batch_size"] == 32  # the resolved value, not 0


def test_metrics_jsonl_records(digits_process):
    _, run_dir = digits_process
    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = digits_train_size() // 32
    every = max(1, steps // 100)  # log.every_steps=0 (auto): about 100 points a run
    for r in records:
        assert {"step", "epoch", "split", "metrics"} <= r.keys(), r
        assert isinstance(r["step"], int) and isinstance(r["epoch"], int) and isinstance(r["metrics"], dict)
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(every, steps + 1, every)) + ([steps] if steps % every else [])
    for r in train:
        assert r["epoch"] == 0 and math.isfinite(r["metrics"]["loss"])
        assert r["lr"] > 0 or r["step"] == steps  # the preset's cosine schedule reaches 0 at the last step
        assert r["throughput"]["img_per_s"] > 0
    assert not [r for r in records if r["split"] == "test"], "test is evaluated once, at the end, not during training"
    evals = [r for r in records if r["split"] == "val"]
    val_size = 1797 - 1797 // 5 - digits_train_size()
    assert len(evals) == 1 and evals[0]["step"] == steps and evals[0]["epoch"] == 1
    assert 0 <= evals[0]["metrics"]["accuracy"] <= 1 and evals[0]["metrics"]["samples"] == val_size
    for split, samples in (("val", val_size), ("test", 1797 // 5)):
        final = [r for r in records if r["split"] == f"final_{split}"]
        assert len(final) == 1 and final[0]["metrics"] == summary(run_dir)["final"][split]
        assert final[0]["metrics"]["samples"] == samples


def test_summary_throughput_is_consistent(digits_process):
    _, run_dir = digits_process
    s = summary(run_dir)
    t = s["throughput"]
    steps, global_batch = s["steps"], 32
    assert steps == digits_train_size() // global_batch and t["steps"] == steps
    for key in ("img_per_s", "img_per_s_per_device", "step_time_ms", "train_seconds", "peak_memory_mb"):
        assert t[key] > 0, key
    assert 0 < t["train_seconds"] <= s["wall_seconds"]
    assert 0 <= t["data_wait_fraction"] <= 1
    assert t["img_per_s"] == pytest.approx(t["img_per_s_per_device"] * s["world_size"])
    assert t["img_per_s"] * t["train_seconds"] == pytest.approx(steps * global_batch, rel=1e-6)
    assert t["step_time_ms"] == pytest.approx(1000 * t["train_seconds"] / steps, rel=1e-6)
