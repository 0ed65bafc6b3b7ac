"""Launching one benchmark case as its user would: `python` for one process, `torchrun` for more; timing
its start-up from outside; reading its steady-state img/s."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.util import clean_env, free_port

REPO = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT_S = 300


class CaseFailed(Exception):
    pass


def launcher(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable]
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(processes),
            "--master_port", str(free_port())]


def start(command: list[str], workdir: Path, log_name: str) -> tuple[subprocess.Popen, float]:
    """Starts `command` in the repo root with a clean environment; returns it and its launch time."""
    launched_at = time.time()
    env = clean_env(workdir, BENCH_LAUNCHED_AT=f"{launched_at:.6f}")
    with open(workdir / f"{log_name}.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, launched_at


def finish(process: subprocess.Popen, workdir: Path, log_name: str) -> None:
    try:
        code = process.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise CaseFailed(f"{log_name}: still running after {LAUNCH_TIMEOUT_S} s") from None
    if code != 0:
        lines = (workdir / f"{log_name}.log").read_text(errors="replace").strip().splitlines()
        # The command's own `error:` lines say why; torchrun's report after them does not.
        shown = [line for line in lines if line.startswith("error: ")][:2] or lines[-15:]
        raise CaseFailed(f"{log_name}: exit code {code}\n    " + "\n    ".join(shown))


def first_record_at(process: subprocess.Popen, metrics: Path) -> float | None:
    """Wall time at which the run's first training record appeared (polled every 10 ms)."""
    while process.poll() is None:
        if metrics.exists() and '"train"' in metrics.read_text():
            return time.time()
        time.sleep(0.01)
    return None


def train_windows(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train" and "throughput" in r]


def steady_img_per_s(windows: list[dict], warmup_steps: int) -> tuple[float, int]:
    """Global img/s, and the steps it covers, over the log windows that start after the warm-up."""
    samples = seconds = 0.0
    steps = 0
    for before, window in zip(windows, windows[1:]):
        if before["step"] < warmup_steps:
            continue
        window_steps = window["step"] - before["step"]
        window_s = window_steps * window["throughput"]["step_time_ms"] / 1000
        seconds, steps = seconds + window_s, steps + window_steps
        samples += window["throughput"]["img_per_s"] * window_s
    if not seconds:
        raise CaseFailed(f"{len(windows)} training log windows, none after the warm-up: no steady-state figure")
    return samples / seconds, steps


def runner_case(workload, folder: Path, processes: int, steps: int, workdir: Path, name: str,
                extra: list[str] = ()) -> dict:
    """train.py end to end: log windows that cover the warm-up, then 5 windows of steady state. Start-up
    is measured from outside: launch to the first log record, less that window's steps after the first."""
    every = max(1, steps // 5)
    warmup_windows = -(-workload.warmup_steps // every)
    args = workload.runner_args(folder, processes) + [
        f"train.max_steps={(warmup_windows + 5) * every}", f"log.every_steps={every}", "eval.every_epochs=0",
        "data.val_fraction=0", "checkpoint.every_epochs=0", "log.trackers=[]", "log.plot=false", "log.progress=lines",
        "dist.threads=1", f"run.root={workdir / 'runs'}", f"run.name={name}", "resume=none", *extra]
    process, launched_at = start(launcher(processes) + [str(REPO / "runner/train.py")] + args, workdir, name)
    run_dir = workdir / "runs" / name
    seen_at = first_record_at(process, run_dir / "metrics.jsonl")
    finish(process, workdir, name)
    windows = train_windows(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    if not windows:
        raise CaseFailed(f"{name}: no training record in {run_dir / 'metrics.jsonl'}")
    first = windows[0]
    outside = None
    if seen_at is not None:
        outside = seen_at - launched_at - (first["step"] - 1) * first["throughput"]["step_time_ms"] / 1000
    # The run's own figure starts when train.py's code starts: after the interpreter, and after torchrun
    # on 2 processes. The figure from outside starts with the command, as the loops' figures do.
    reported = summary.get("time", {}).get("startup_seconds", summary.get("startup_seconds"))
    img_per_s, timed_steps = steady_img_per_s(windows, workload.warmup_steps)
    return {workload.name: {"img_per_s": img_per_s, "steps": timed_steps,
                            "startup_seconds": outside, "startup_reported_seconds": reported}}


def loops_case(jobs: dict, processes: int, workdir: Path, name: str) -> dict:
    """benchmarks/loops.py in one launch: {framework: [(workload, folder, steps)]} -> {framework: {workload:
    result}}."""
    out = workdir / f"{name}.json"
    out.unlink(missing_ok=True)
    specs = [f"{framework}.{w.name}={folder}:{steps}" for framework, runs in jobs.items()
             for w, folder, steps in runs]
    command = launcher(processes) + [str(REPO / "benchmarks/loops.py"), "--out", str(out)] + specs
    process, _ = start(command, workdir, name)
    finish(process, workdir, name)
    return json.loads(out.read_text())["results"]
