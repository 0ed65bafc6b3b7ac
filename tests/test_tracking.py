"""What a run reports: TensorBoard events, curves.png, console output, summary figures."""
from __future__ import annotations

import json
import os
import re
import select
import subprocess
import time

import pytest
from PIL import Image

from tests.util import PYTHON, REPO, clean_env, read_jsonl

SHORT = ["--config", "digits", "train.epochs=2", "train.limit_train_steps=10", "log.every_steps=2"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One real run with the default tracker (TensorBoard) and plot."""
    from tests.util import run_train

    tmp = tmp_path_factory.mktemp("tracked")
    result = run_train(SHORT + ["run.name=tracked"], tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "runs" / "tracked", result


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
