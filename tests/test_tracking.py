"""What a run reports (runner/tracking.py, runner/plot.py): TensorBoard events, curves.png, console output,
metrics.jsonl, summary.json and its throughput figures, and time that is continuous across resumes.
"""
from __future__ import annotations

import json
import math
import os
import re
import select
import subprocess
import time

import pytest
import yaml
from PIL import Image

from runner.config import load_raw
from runner.data.splits import DataConfig, load_splits

from tests.util import (DIGITS, PYTHON, REPO, RUN_FILES, SHORT_EPOCH, assert_time_is_continuous, clean_env, ok,
                        read_jsonl, run_train, summary)


SHORT = ["--config", "digits", "train.epochs=2", "train.limit_train_steps=10", "log.every_steps=2"]


def digits_train_size() -> int:
    """The preset's training split (it holds out a validation split)."""
    return len(load_splits(DataConfig(**load_raw("digits")["data"]), seed=0).train)


@pytest.fixture(scope="module")
def digits_process(tmp_path_factory):
    """One real `runner/train.py --config digits train.epochs=1` process, stdout piped (not a terminal),
    with the default trackers and plot."""
    tmp = tmp_path_factory.mktemp("digits_process")
    result = run_train(["--config", "digits", "train.epochs=1"], tmp)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result, tmp / "runs" / "digits"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One real run with the default tracker (TensorBoard) and plot."""
    tmp = tmp_path_factory.mktemp("tracked")
    result = run_train(SHORT + ["run.name=tracked"], tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "runs" / "tracked", result


def test_time_is_continuous_after_a_max_steps_stop(tmp_path, train_main):
    args = DIGITS + SHORT_EPOCH + ["run.name=timed", "log.every_steps=1"]
    ok(train_main(args + ["train.max_steps=4"]))
    ok(train_main(args))
    assert_time_is_continuous(tmp_path / "runs" / "timed")


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


def test_summary_throughput_is_consistent_per_device(digits_process):
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


def test_tensorboard_events_hold_the_logged_scalars(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tracked_run
    event_files = list((run_dir / "tracking").rglob("events.out.tfevents.*"))
    assert event_files, "no TensorBoard event file under tracking/"
    scalars = {}
    for f in event_files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in train]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["metrics"]["loss"] for r in train], rel=1e-6)
    evals = [r for r in records if r["split"] == "val"]  # the preset holds out val; test is final only
    assert evals and [v for _, v in scalars["val/accuracy"]] == pytest.approx([r["metrics"]["accuracy"] for r in evals])
    assert "train/lr" in scalars and "throughput/img_per_s" in scalars


def test_curves_png_is_a_real_plot(tracked_run):
    run_dir, _ = tracked_run
    with Image.open(run_dir / "curves.png") as image:
        image.load()
        width, height = image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert 600 <= width <= 2000 and 400 <= height <= 1500
    assert colours is None or len(colours) > 20, "the image is nearly blank"


def test_plot_script_redraws_from_metrics(tracked_run, tmp_path):
    import shutil

    run_dir, _ = tracked_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "curves.png").unlink()
    result = subprocess.run([PYTHON, str(REPO / "runner/plot.py"), str(copy)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (copy / "curves.png").stat().st_size > 10_000
    bad = subprocess.run([PYTHON, str(REPO / "runner/plot.py"), str(tmp_path / "nothing")], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_console_header_and_summary_when_not_a_terminal(tracked_run):
    _, result = tracked_run
    out = result.stdout
    for fact in ("world 1", "precision no", "global 32", "accumulation 1", "train 1295", "val 143", "test 359", "7,850 parameters",
                 "runs/tracked"):
        assert fact in out, f"header lacks {fact!r}"
    assert re.search(r"epoch 2/2 +step 20/20 .* img/s .* eta", out), "no plain progress line"
    assert "test  accuracy" in out and "img/s" in out.split("=" * 64)[-2]
    assert "\r" not in out and "\x1b" not in out


def test_summary_throughput_is_consistent(tracked_run):
    run_dir, _ = tracked_run
    summary = json.loads((run_dir / "summary.json").read_text())
    t = summary["throughput"]
    assert t["steps"] == summary["steps"] == 20
    assert t["img_per_s"] == pytest.approx(summary["steps"] * 32 / t["train_seconds"], rel=1e-6)
    assert 0 < t["train_seconds"] <= summary["wall_seconds"]
    assert t["step_time_ms"] == pytest.approx(1000 * t["train_seconds"] / t["steps"], rel=1e-6)
    assert 0 <= t["data_wait_fraction"] < 1 and t["peak_memory_mb"] > 0


def test_progress_bar_on_a_terminal(tmp_path):
    """On a pseudo-terminal the main process draws a progress bar (carriage returns) instead of lines."""
    master, slave = os.openpty()
    proc = subprocess.Popen([PYTHON, str(REPO / "runner/train.py")] + SHORT + [
        "run.name=tty", f"run.root={tmp_path / 'runs'}", "log.trackers=[]", "log.plot=false"],
        cwd=REPO, env=clean_env(tmp_path), stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks, deadline = [], time.time() + 240
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    out = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, out[-2000:]
    assert "\r" in out and "20/20" in out
    assert not re.search(r"^epoch 2/2 +step", out, re.M), "plain lines should give way to the bar"

