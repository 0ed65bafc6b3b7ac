"""Sweeps (runner/sweep.py, slurm/sweep.sbatch) and run comparison (runner/compare.py).

The sweep tests run real tiny trainings: two tasks one after another here, and three tasks as a real Slurm
job array with one task preempted by `scancel --signal=USR1 <array>_<task>`, requeued and resumed. The
comparison is tested on those runs and on run directories written by hand, whose order is known.
"""
from __future__ import annotations

import csv
import itertools
import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.dist_helpers import error_lines
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)
from tests.util import PYTHON, REPO, clean_env, read_jsonl, summary

SWEEP = str(REPO / "runner" / "sweep.py")
COMPARE = str(REPO / "runner" / "compare.py")
TINY = ["--config", "digits", "train.epochs=1", "train.limit_train_steps=3", "log.trackers=[]", "log.plot=false",
        "log.progress=lines"]


def write_sweep(path: Path, **content) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def run(script: str, args: list, tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, script, *map(str, args)], cwd=tmp_path, env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


def ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def table_rows(markdown: str) -> list[dict]:
    """The rows of the first table in the text (compare.py may print a table of seed groups after it)."""
    text = markdown[markdown.index("\n| "):]
    lines = list(itertools.takewhile(lambda line: line.startswith("|"), text.strip("\n").splitlines()))
    lines = [line for line in lines if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


# ---------------------------------------------------------------------------------------------- sweep files

def test_sweep_lists_tasks_names_and_the_sbatch_line(tmp_path):
    sweep = write_sweep(tmp_path / "lr.yaml", name="lr", fixed={"train.epochs": 2},
                        runs=[{"schedule.name": "constant"}, {"schedule": {"name": "cosine", "warmup_steps": 5}}],
                        grid={"optim.lr": [0.1, 0.05], "train.seed": [0, 1]})
    out = ok(run(SWEEP, [sweep, "--config", "digits", "log.plot=false"], tmp_path))
    assert out.startswith(f"8 tasks in sweep lr ({sweep}), config digits"), out
    names = re.findall(r"^  task (\d+)\s+(\S+)\s+(.*)$", out, re.M)
    assert [int(i) for i, _, _ in names] == list(range(8))
    assert names[0][1:] == ("lr-name_constant-lr_0.1-seed_0", "schedule.name=constant optim.lr=0.1 train.seed=0")
    assert names[7][1:] == ("lr-name_cosine-warmup_steps_5-lr_0.05-seed_1",
                            "schedule.name=cosine schedule.warmup_steps=5 optim.lr=0.05 train.seed=1")
    assert len({n for _, n, _ in names}) == 8
    line = next(line.strip() for line in out.splitlines() if line.strip().startswith("sbatch "))
    assert shlex.split(line) == ["sbatch", "--array=0-7", "slurm/sweep.sbatch", str(sweep), "--config", "digits",
                                 "log.plot=false"]


@pytest.mark.parametrize("content, args, named", [
    ({"grid": {"optim.lrr": [0.1, 0.2]}}, [], "task 0 (bad-lrr_0.1): unknown config key optim.lrr; did you mean optim.lr?"),
    ({"grid": {"optim.lr": [0.1, -1.0]}}, [], "task 1 (bad-lr_-1.0): optim.lr=-1.0"),
    ({"grid": {"optim.lr": 0.1}}, [], "grid.optim.lr must be a non-empty list"),
    ({"name": "bad"}, [], "has neither `grid` nor `runs`"),
    ({"runs": [{"run.name": "x"}]}, [], "task 0 sets run.name"),
    ({"grid": {"optim.lr": [0.1]}, "sweeps": 1}, [], "unknown key sweeps"),
    ({"grid": {"optim.lr": [0.1]}}, ["optim.lr=0.3"], "optim.lr=0.3 on the command line would override a swept key"),
    ({"grid": {"optim.lr": [0.1]}}, ["--task", "1"], "--task 1 is out of range: sweep"),
])
def test_sweep_refuses_bad_input_in_one_line(tmp_path, content, args, named):
    sweep = write_sweep(tmp_path / "bad.yaml", **content)
    result = run(SWEEP, [sweep, *args], tmp_path)
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and named in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_sweep_script_refuses_to_run_outside_an_array(tmp_path):
    script = REPO / "slurm" / "sweep.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    directives = re.findall(r"^#SBATCH\s+(\S+)", script.read_text(), flags=re.M)
    assert {"--requeue", "--open-mode=append", "--signal=USR1@90", "--output=slurm-%x-%A_%a.out"} <= set(directives)
    result = subprocess.run(["bash", str(script), "sweep.yaml"], capture_output=True, text=True,
                            env=clean_env(tmp_path))
    assert result.returncode == 2 and "runs as a job array" in result.stderr


# ---------------------------------------------------------------------------------------------- compare

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
    out = ok(run(COMPARE, [runs / "low", str(runs / "[hr]*"), "--out", tmp_path / "out" / "cmp"], tmp_path, 120))
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
    out = ok(run(COMPARE, [runs / "a", runs / "b", runs / "c"], tmp_path, 120))
    assert [r["run"] for r in table_rows(out)] == ["b", "a", "c"]  # val loss = 1 - accuracy: lowest first
    assert (tmp_path / "comparison.csv").is_file() and (tmp_path / "comparison.png").is_file()


@pytest.mark.parametrize("target, named", [("not_a_run", "is not a run directory: it holds neither"),
                                           ("missing", "is not a run directory (no such directory)"),
                                           ("nothing-*", "matches no directory")])
def test_compare_refuses_what_is_not_a_run(tmp_path, target, named):
    fake_run(tmp_path, "good", 0.1, [0.5], {"accuracy": 0.5, "loss": 1.0})
    (tmp_path / "not_a_run").mkdir()
    result = run(COMPARE, [tmp_path / "good", tmp_path / target], tmp_path, 120)
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and named in lines[0] and target.rstrip("*") in lines[0], \
        result.stderr
    assert not list(tmp_path.glob("comparison.*")), "nothing is written on bad input"


# ---------------------------------------------------------------------------------------------- real runs

@pytest.mark.slow
def test_local_sweep_runs_each_task_then_compare(tmp_path):
    sweep = write_sweep(tmp_path / "local.yaml", grid={"optim.lr": [0.2, 0.01]})
    out = ok(run(SWEEP, [sweep, "--local", *TINY, f"run.root={tmp_path / 'runs'}"], tmp_path, 600))
    assert "[sweep local] 2 of 2 tasks finished" in out, out
    for name, lr in (("local-lr_0.2", 0.2), ("local-lr_0.01", 0.01)):
        run_dir = tmp_path / "runs" / name
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == lr
        assert summary(run_dir)["steps"] == 3 and summary(run_dir)["stopped"] == "completed"
    # One task again, as an array task runs it: the same run, already finished, is left as it is.
    before = (tmp_path / "runs" / "local-lr_0.01" / "summary.json").read_text()
    again = ok(run(SWEEP, [sweep, "--task", "1", *TINY, f"run.root={tmp_path / 'runs'}"], tmp_path, 300))
    assert "[sweep local] task 1: " in again and "run.name=local-lr_0.01" in again, again
    assert "has already finished" in again and (tmp_path / "runs" / "local-lr_0.01" / "summary.json").read_text() == before
    compared = ok(run(COMPARE, [str(tmp_path / "runs" / "local-*")], tmp_path, 120))
    rows = table_rows(compared)
    assert sorted(r["run"] for r in rows) == ["local-lr_0.01", "local-lr_0.2"]
    assert all(r["status"] == "completed" and r["steps"] == "3" for r in rows)
    accuracies = [float(r["best val accuracy"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)


# ---------------------------------------------------------------------------------------------- Slurm

# 1295 training samples / global batch 4 = 323 steps per epoch, 2 epochs: long enough that the task signalled at
# its first logged step is still training when SIGUSR1 arrives.
ARRAY_TRAIN = ["--config", "digits", "train.epochs=2", "train.global_batch_size=4", "log.every_steps=5",
               "log.trackers=[]", "log.plot=false", "log.progress=lines", "checkpoint.keep_last=5"]
PREEMPTED_TASK = 1


def first_train_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("split") == "train":
            return record["step"]
    return 0


def wait_and_preempt(cluster, task_job: str, run_dir: Path, timeout: float = 180) -> int:
    deadline = time.time() + timeout
    while not (step := first_train_step(run_dir)):
        assert time.time() < deadline, f"task {task_job} logged no training step within {timeout:.0f} s"
        time.sleep(0.1)
    sent = subprocess.run(["scancel", "--signal=USR1", task_job], env=cluster.env(), capture_output=True,
                          text=True, timeout=30)
    assert sent.returncode == 0, sent.stderr
    return step


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_as_slurm_array_with_a_preempted_task_then_compare(slurm_cluster, tmp_path):  # noqa: F811
    from tests.test_slurm import job_env

    cluster = slurm_cluster
    sweep = write_sweep(tmp_path / "array.yaml", name="arr", grid={"optim.lr": [0.1, 0.05, 0.02]})
    args = [str(sweep), *ARRAY_TRAIN, f"run.root={tmp_path / 'runs'}"]
    listing = ok(run(SWEEP, args, tmp_path))
    names = re.findall(r"^  task \d+\s+(\S+)", listing, re.M)
    array = re.search(r"sbatch (--array=\S+) slurm/sweep.sbatch", listing).group(1)
    assert array == "--array=0-2" and len(names) == 3, listing
    job = cluster.sbatch([array, f"--output={tmp_path}/slurm-%A_%a.out", "slurm/sweep.sbatch", *args],
                         env=job_env(tmp_path), cwd=REPO)
    try:
        task_job = f"{job}_{PREEMPTED_TASK}"
        signalled_at = wait_and_preempt(cluster, task_job, tmp_path / "runs" / names[PREEMPTED_TASK])
        cluster.wait(job, timeout=420)
    finally:
        subprocess.run(["scancel", job], env=cluster.env(), capture_output=True, timeout=30)
    outputs = {i: (tmp_path / f"slurm-{job}_{i}.out").read_text(errors="replace") for i in range(3)}
    steps = set()
    for i, name in enumerate(names):
        info = cluster.show_job(f"{job}_{i}")
        assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{outputs[i][-3000:]}"
        assert info.get("Restarts") == ("1" if i == PREEMPTED_TASK else "0"), f"{info}\n{outputs[i][-3000:]}"
        result = summary(tmp_path / "runs" / name)
        assert (result["stopped"], result["epochs_completed"]) == ("completed", 2), result
        steps.add(result["steps"])
    assert len(steps) == 1, f"the preempted task trained as many steps as the others: {steps}"
    total = steps.pop()
    output = outputs[PREEMPTED_TASK]
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+)", output)
    assert stopped and f"requeueing Slurm job {task_job}" in output, output[-4000:]
    step = int(stopped.group(1))
    assert signalled_at <= step < total
    assert re.search(rf"resumed from \S*{names[PREEMPTED_TASK]}/checkpoints/step_{step:08d}", output), output[-4000:]
    train_steps = [r["step"] for r in read_jsonl(tmp_path / "runs" / names[PREEMPTED_TASK] / "metrics.jsonl")
                   if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)), "the resumed run repeats no logged step"
    compared = ok(run(COMPARE, [tmp_path / "runs" / n for n in names], tmp_path, 120))
    rows = table_rows(compared)
    assert sorted(r["run"] for r in rows) == sorted(names) and all(r["status"] == "completed" for r in rows)
    assert "differing config keys: optim.lr" in compared
    print(f"\narray {job}: task {PREEMPTED_TASK} signalled at step {signalled_at}, checkpointed at {step}, "
          f"requeued and finished\n{compared}")
