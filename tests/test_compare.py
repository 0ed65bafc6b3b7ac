"""Comparing runs (runner/compare.py): the table, its order by the monitored metric, unfinished runs, and
what is not a run; the split of each column, the best run's lead against the evaluation's noise, seed groups,
the plot, and run files of the wrong shape. Run directories are written by hand here, so the expected order
is known.
"""
from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.dist_helpers import error_lines
from tests.util import COMPARE, PYTHON, clean_env, ok, run_tool, table_rows


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
    assert "3 runs, best val accuracy first; differing config keys: optim.lr, train.seed" in out
    printed = table_rows(out)
    assert [r["run"] for r in printed] == ["high", "running", "low"]
    high, running, low = printed
    assert (high["best val accuracy"], high["best step"], high["final test accuracy"], high["steps"]) == ("0.8", "20", "0.75", "30")
    assert (high["optim.lr"], high["train.seed"], high["status"], high["img/s"]) == ("0.1", "-", "completed", "2,000")
    assert (running["status"], running["best val accuracy"], running["steps"], running["final test accuracy"],
            running["img/s"]) == ("incomplete", "0.6", "20", "-", "1,001")
    assert low["wall s"] == "12.5" and "run.name" not in high
    with open(tmp_path / "out" / "cmp.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["high", "running", "low"] and float(rows[0]["best val accuracy"]) == 0.8
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


# ------------------------------------------------------------------------------------ why the best is best

VAL_SAMPLES = 143


def write_run(root: Path, name: str, accuracies: list[float], seed: int = 0, lr: float = 0.1) -> Path:
    """A finished run as runner/train.py writes it: val evaluations of VAL_SAMPLES samples, a summary."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {"optim": {"lr": lr}, "train": {"seed": seed}, "eval": {"monitor": "accuracy"}, "run": {"name": name}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    records = []
    for i, accuracy in enumerate(accuracies):
        step = 10 * (i + 1)
        records.append({"step": step, "epoch": i, "split": "train", "metrics": {"loss": 1.5 - accuracy}, "lr": lr})
        records.append({"step": step, "epoch": i + 1, "split": "val",
                        "metrics": {"accuracy": accuracy, "loss": 1 - accuracy, "samples": VAL_SAMPLES}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    best = max(range(len(accuracies)), key=lambda i: accuracies[i])
    (run_dir / "summary.json").write_text(json.dumps({
        "stopped": "completed", "steps": 10 * len(accuracies), "epochs_completed": len(accuracies),
        "final": {"val": {"accuracy": accuracies[-1], "loss": 0.5}, "test": {"accuracy": 0.9, "loss": 0.4}},
        "wall_seconds": 3.0, "best": {"split": "val", "metric": "accuracy", "value": accuracies[best],
                                      "step": 10 * (best + 1)}, "throughput": {"img_per_s": 100.0}}))
    return run_dir


def compare(args: list, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, COMPARE, *map(str, args)], cwd=tmp_path, env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=120)


def first_table(out: str) -> tuple[list[str], list[list[str]]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|-"):
            table.append([c.strip() for c in line.strip("|").split("|")])
    return table[0], table[1:]


def test_columns_name_their_split_and_a_one_sample_lead_is_within_noise(tmp_path):
    # 136/143 against 135/143: the best run wins by one validation sample.
    write_run(tmp_path / "runs", "a", [0.90, 136 / VAL_SAMPLES], lr=0.1)
    write_run(tmp_path / "runs", "b", [0.92, 135 / VAL_SAMPLES], lr=0.05)
    result = compare([tmp_path / "runs" / "b", tmp_path / "runs" / "a"], tmp_path)
    assert result.returncode == 0, result.stderr
    header, rows = first_table(result.stdout)
    assert {"best val accuracy", "final test accuracy", "final test loss"} <= set(header), header
    assert [r[0] for r in rows] == ["a", "b"]
    assert f"+1 of {VAL_SAMPLES} val samples: within noise" in result.stdout, result.stdout


def test_a_lead_of_many_samples_is_more_than_noise(tmp_path):
    write_run(tmp_path / "runs", "good", [0.95])
    write_run(tmp_path / "runs", "poor", [0.50], lr=0.5)
    result = compare([str(tmp_path / "runs" / "*")], tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("best: good"))
    assert re.search(rf"\+64 of {VAL_SAMPLES} val samples: more than 2 standard errors", line), line


def test_runs_that_differ_only_in_the_seed_are_grouped(tmp_path):
    for seed, accuracy in ((0, 0.80), (1, 0.84), (2, 0.82)):
        write_run(tmp_path / "runs", f"lr1-s{seed}", [accuracy], seed=seed, lr=0.1)
    write_run(tmp_path / "runs", "lr5-s0", [0.70], seed=0, lr=0.5)
    result = compare([str(tmp_path / "runs" / "*")], tmp_path)
    assert result.returncode == 0, result.stderr
    groups = result.stdout.split("differ only in train.seed")[1]
    row = next(line for line in groups.splitlines() if "lr1-s0 lr1-s1 lr1-s2" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:] == ["3", "0.8200 ± 0.0200"], row
    assert "lr5-s0" not in groups, "a run alone is no group"


def test_the_plot_shows_eval_loss_and_keeps_identical_runs_visible(tmp_path):
    write_run(tmp_path / "runs", "twin-a", [0.5, 0.6, 0.7, 0.8], lr=0.1)
    write_run(tmp_path / "runs", "twin-b", [0.5, 0.6, 0.7, 0.8], lr=0.2)
    result = compare([str(tmp_path / "runs" / "twin-*"), "--out", tmp_path / "cmp"], tmp_path)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "cmp.png") as image:
        width, height = image.size
        colours = dict((rgb, n) for n, rgb in image.convert("RGB").getcolors(maxcolors=1 << 20))
    assert width > 1.5 * height, "three panels side by side: accuracy, eval loss, train loss"
    first, second = (31, 119, 180), (255, 127, 14)  # matplotlib's C0 and C1
    assert colours.get(first, 0) > 300 and colours.get(second, 0) > 300, \
        "the run drawn first must stay visible under the second"


@pytest.mark.parametrize("file, content, reason", [
    ("summary.json", '{"final": [0.5], "stopped": "completed"}', "summary.json: final is not a mapping"),
    ("summary.json", "[1, 2, 3]", "summary.json is a JSON list, not a summary"),
    ("metrics.jsonl", '{"step": 10, "split": "val", "metrics": [0.5]}\n', "metrics.jsonl line 1: metrics is not"),
    ("metrics.jsonl", '"just a string"\n', "metrics.jsonl line 1 is a JSON str, not a record"),
])
def test_a_run_file_of_the_wrong_shape_is_listed_as_unreadable(tmp_path, file, content, reason):
    write_run(tmp_path / "runs", "fine", [0.9])
    broken = write_run(tmp_path / "runs", "broken", [0.95])
    (broken / file).write_text(content)
    result = compare([tmp_path / "runs" / "fine", broken], tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    _, rows = first_table(result.stdout)
    assert [r[0] for r in rows] == ["fine", "broken"]
    assert rows[1][1].startswith("unreadable: ") and reason in rows[1][1], rows[1]
    assert rows[0][1] == "completed" and (tmp_path / "comparison.png").is_file()
