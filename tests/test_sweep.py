"""Sweeps (runner/sweep.py, slurm/sweep.sbatch).

The sweep tests run real tiny trainings: two tasks one after another here, and three tasks as a real Slurm
job array with one task preempted by `scancel --signal=USR1 <array>_<task>`, requeued and resumed. The
comparison of those runs is checked at the end of each.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.dist_helpers import error_lines
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)
from tests.util import (COMPARE, REPO, SWEEP, clean_env, ok, read_jsonl, records_so_far, run_tool, summary,
                        table_rows)


TINY = ["--config", "digits", "train.epochs=1", "train.limit_train_steps=3", "log.trackers=[]", "log.plot=false",
        "log.progress=lines"]


def write_sweep(path: Path, **content) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


# its first logged step is still training when SIGUSR1 arrives.
ARRAY_TRAIN = ["--config", "digits", "train.epochs=2", "train.global_batch_size=4", "log.every_steps=5",
               "log.trackers=[]", "log.plot=false", "log.progress=lines", "checkpoint.keep_last=5"]


PREEMPTED_TASK = 1


def first_train_step(run_dir: Path) -> int:
    return next((r["step"] for r in records_so_far(run_dir) if r.get("split") == "train"), 0)


def wait_and_preempt(cluster, task_job: str, run_dir: Path, timeout: float = 180) -> int:
    deadline = time.time() + timeout
    while not (step := first_train_step(run_dir)):
        assert time.time() < deadline, f"task {task_job} logged no training step within {timeout:.0f} s"
        time.sleep(0.1)
    sent = subprocess.run(["scancel", "--signal=USR1", task_job], env=cluster.env(), capture_output=True,
                          text=True, timeout=30)
    assert sent.returncode == 0, sent.stderr
    return step


def test_sweep_lists_tasks_names_and_the_sbatch_line(tmp_path):
    sweep = write_sweep(tmp_path / "lr.yaml", name="lr", fixed={"train.epochs": 2},
                        runs=[{"schedule.name": "constant"}, {"schedule": {"name": "cosine", "warmup_steps": 5}}],
                        grid={"optim.lr": [0.1, 0.05], "train.seed": [0, 1]})
    out = ok(run_tool(SWEEP, [sweep, "--config", "digits", "log.plot=false"], tmp_path)).stdout
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
    result = run_tool(SWEEP, [sweep, *args], tmp_path)
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


@pytest.mark.slow
def test_local_sweep_runs_each_task_then_compare(tmp_path):
    sweep = write_sweep(tmp_path / "local.yaml", grid={"optim.lr": [0.2, 0.01]})
    runs = f"run.root={tmp_path / 'runs'}"
    out = ok(run_tool(SWEEP, [sweep, "--local", *TINY, runs], tmp_path, 600)).stdout
    assert "[sweep local] 2 of 2 tasks finished" in out, out
    for name, lr in (("local-lr_0.2", 0.2), ("local-lr_0.01", 0.01)):
        run_dir = tmp_path / "runs" / name
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == lr
        assert summary(run_dir)["steps"] == 3 and summary(run_dir)["stopped"] == "completed"
    # One task again, as an array task runs it: the same run, already finished, is left as it is.
    before = (tmp_path / "runs" / "local-lr_0.01" / "summary.json").read_text()
    again = ok(run_tool(SWEEP, [sweep, "--task", "1", *TINY, runs], tmp_path, 300)).stdout
    assert "[sweep local] task 1: " in again and "run.name=local-lr_0.01" in again, again
    assert "has already finished" in again and (tmp_path / "runs" / "local-lr_0.01" / "summary.json").read_text() == before
    compared = ok(run_tool(COMPARE, [str(tmp_path / "runs" / "local-*")], tmp_path, 120)).stdout
    rows = table_rows(compared)
    assert sorted(r["run"] for r in rows) == ["local-lr_0.01", "local-lr_0.2"]
    assert all(r["status"] == "completed" and r["steps"] == "3" for r in rows)
    accuracies = [float(r["best val accuracy"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_as_slurm_array_with_a_preempted_task_then_compare(slurm_cluster, tmp_path):  # noqa: F811
    from tests.test_slurm import job_env

    cluster = slurm_cluster
    sweep = write_sweep(tmp_path / "array.yaml", name="arr", grid={"optim.lr": [0.1, 0.05, 0.02]})
    args = [str(sweep), *ARRAY_TRAIN, f"run.root={tmp_path / 'runs'}"]
    listing = ok(run_tool(SWEEP, args, tmp_path)).stdout
    names = re.findall(r"^  task \d+\s+(\S+)", listing, re.M)
    array = re.search(r"sbatch (--array=\S+) slurm/sweep.sbatch", listing).group(1)
    assert array == "--array=0-2" and len(names) == 3, listing
    job = cluster.sbatch([array, f"--output={tmp_path}/slurm-%A_%a.out", "slurm/sweep.sbatch", *args],
                         env=job_env(tmp_path), cwd=REPO)
    try:
        task_job = f"{job}_{PREEMPTED_TASK}"
        signalled_at = wait_and_preempt(cluster, task_job, tmp_path / "runs" / names[PREEMPTED_TASK])
        cluster.wait(job, timeout=600)
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
    compared = ok(run_tool(COMPARE, [tmp_path / "runs" / n for n in names], tmp_path, 120)).stdout
    rows = table_rows(compared)
    assert sorted(r["run"] for r in rows) == sorted(names) and all(r["status"] == "completed" for r in rows)
    assert "differing config keys: optim.lr" in compared
    print(f"\narray {job}: task {PREEMPTED_TASK} signalled at step {signalled_at}, checkpointed at {step}, "
          f"requeued and finished\n{compared}")

