"""The benchmark (benchmarks/bench.py): its steady-state arithmetic, and one short real run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def window(step: int, img_per_s: float, step_time_ms: float) -> dict:
    return {"step": step, "split": "train", "throughput": {"img_per_s": img_per_s, "step_time_ms": step_time_ms}}


def test_steady_state_leaves_out_the_windows_of_the_warm_up():
    from benchmarks.launch import CaseFailed, steady_img_per_s

    # 4 steps per window; the warm-up (5 steps) ends inside the second window, so only the last two count,
    # weighted by their time (equal here).
    windows = [window(4, 10.0, 100), window(8, 50.0, 10), window(12, 100.0, 10), window(16, 300.0, 10)]
    img_per_s, steps = steady_img_per_s(windows, warmup_steps=5)
    assert steps == 8
    assert img_per_s == pytest.approx(200.0)
    with pytest.raises(CaseFailed):
        steady_img_per_s(windows[:1], warmup_steps=5)


def test_ratios_come_from_the_medians_of_the_rounds():
    from benchmarks.bench import summarise

    results = {("cnn", "runner 1x1"): [{"img_per_s": v} for v in (90.0, 100.0, 400.0)],
               ("cnn", "accelerate 1x1"): [{"img_per_s": v} for v in (50.0, 200.0, 210.0)]}
    summary = summarise(results)
    assert summary["cases"]["cnn runner 1x1"]["img_per_s"]["median"] == 100.0
    assert summary["cases"]["cnn runner 1x1"]["img_per_s"]["min"] == 90.0
    assert summary["ratios"]["cnn"]["runner / accelerate 1x1"] == pytest.approx(0.5)


@pytest.mark.slow
def test_a_short_benchmark_runs_every_case_it_names(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--only", "linear", "--rounds", "1",
                             "--seconds", "0.2", "--frameworks", "runner,accelerate", "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["cases"]) == {"linear runner 1x1", "linear runner 2x1", "linear accelerate 1x1",
                                    "linear accelerate 2x1"}
    for case in report["cases"].values():
        assert case["img_per_s"]["median"] > 0 and case["startup_seconds"]["median"] > 0
    assert "runner / accelerate 2x1" in report["ratios"]["linear"]
    assert report["machine"]["cores"] >= 1 and "| runner 2x1 |" in result.stdout
