"""Comparing runs (runner/compare.py): the table, its order by the monitored metric, unfinished runs, and
what is not a run. Run directories are written by hand here, so the expected order is known.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.dist_helpers import error_lines
from tests.util import COMPARE, ok, run_tool, table_rows


def fake_run(root: Path, name: str, lr: float, accuracies: list[float], final: dict | None, **config) -> Path:
    """A run directory as runner/train.py writes it; final=None: no summary.json yet (still running)."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg = {"optim": {"lr": lr, "momentum": 0.9}, "eval": {"monitor": "accuracy"}, "run": {"name": name}}
    for key, value in config.items():
        section, leaf = key.split("__")
        cfg.setdefault(section, {})[leaf] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for i, accuracy in enumerate(accuracies):
        step = 10 * (i + 1)
        lines.append({"step": step, "epoch": i, "split": "train", "metrics": {"loss": 2.0 / (i + 1)}, "lr": lr,
                      "throughput": {"img_per_s": 1000.0 + i}})
        lines.append({"step": step, "epoch": i + 1, "split": "val", "metrics": {"accuracy": accuracy, "loss": 1 - accuracy}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 99, "spl')
    if final is not None:
        best = max(range(len(accuracies)), key=lambda i: accuracies[i])
        (run_dir / "summary.json").write_text(json.dumps({
            "stopped": "completed", "steps": 10 * len(accuracies), "epochs_completed": len(accuracies),
            "final": {"val": final, "test": final}, "wall_seconds": 12.5,
            "best": {"metric": "accuracy", "value": accuracies[best], "step": 10 * (best + 1), "checkpoint": None},
            "throughput": {"img_per_s": 2000.0}}))
    return run_dir


def test_compare_sorts_by_the_monitored_metric_and_shows_unfinished_runs(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "low", 0.5, [0.3, 0.4], {"accuracy": 0.41, "loss": 0.9})
    fake_run(runs, "high", 0.1, [0.6, 0.8, 0.7], {"accuracy": 0.75, "loss": 0.3})
    fake_run(runs, "running", 0.1, [0.5, 0.6], None, train__seed=1)
    out = ok(run_tool(COMPARE, [runs / "low", str(runs / "[hr]*"), "--out", tmp_path / "out" / "cmp"], tmp_path,
                 120)).stdout
    assert "3 runs, best accuracy first; differing config keys: optim.lr, train.seed" in out
    printed = table_rows(out)
    assert [r["run"] for r in printed] == ["high", "running", "low"]
    high, running, low = printed
    assert (high["best accuracy"], high["best step"], high["final accuracy"], high["steps"]) == ("0.8", "20", "0.75", "30")
    assert (high["optim.lr"], high["train.seed"], high["status"], high["img/s"]) == ("0.1", "-", "completed", "2,000")
    assert (running["status"], running["best accuracy"], running["steps"], running["final accuracy"],
            running["img/s"]) == ("incomplete", "0.6", "20", "-", "1,001")
    assert low["wall s"] == "12.5" and "run.name" not in high
    with open(tmp_path / "out" / "cmp.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["high", "running", "low"] and float(rows[0]["best accuracy"]) == 0.8
    assert table_rows((tmp_path / "out" / "cmp.md").read_text()) == printed
    png = (tmp_path / "out" / "cmp.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_compare_sorts_by_loss_ascending_when_loss_is_monitored(tmp_path):
    runs = tmp_path / "runs"
    for name, accuracies in (("a", [0.2, 0.9]), ("b", [0.5, 0.95]), ("c", [0.1, 0.3])):
        run_dir = fake_run(runs, name, 0.1, accuracies, None)
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config["eval"]["monitor"] = "loss"
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    out = ok(run_tool(COMPARE, [runs / "a", runs / "b", runs / "c"], tmp_path, 120)).stdout
    assert [r["run"] for r in table_rows(out)] == ["b", "a", "c"]  # val loss = 1 - accuracy: lowest first
    assert (tmp_path / "comparison.csv").is_file() and (tmp_path / "comparison.png").is_file()


@pytest.mark.parametrize("target, named", [("not_a_run", "is not a run directory: it holds neither"),
                                           ("missing", "is not a run directory (no such directory)"),
                                           ("nothing-*", "matches no directory")])
def test_compare_refuses_what_is_not_a_run(tmp_path, target, named):
    fake_run(tmp_path, "good", 0.1, [0.5], {"accuracy": 0.5, "loss": 1.0})
    (tmp_path / "not_a_run").mkdir()
    result = run_tool(COMPARE, [tmp_path / "good", tmp_path / target], tmp_path, 120)
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and named in lines[0] and target.rstrip("*") in lines[0], \
        result.stderr
    assert not list(tmp_path.glob("comparison.*")), "nothing is written on bad input"

