"""runner/compare.py on run directories written by hand, whose numbers are known: the split of each column,
the best run's lead against the evaluation's noise, seed groups, the plot, and run files of the wrong shape."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.util import PYTHON, REPO, clean_env

COMPARE = str(REPO / "runner" / "compare.py")
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
