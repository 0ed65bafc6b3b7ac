"""MLflow and W&B keep one tracker run across every segment of a training run, and never kill training.

A real `mlflow server` (SQLite backend, 127.0.0.1, a free port) is started once per session; everything is
checked through MLflow's client. W&B runs offline. Every case trains for real.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from runner.config import flatten
from runner.plot import resume_steps
from tests.dist_helpers import Background, checkpoints, error_lines, torchrun
from tests.util import BIN, PYTHON, REPO, clean_env, free_port, read_jsonl, records_so_far

# 1295 training samples / global batch 16 = 80 steps per epoch; a checkpoint every 20 steps.
TRAIN = ["--config", "digits", "train.epochs=1", "train.global_batch_size=16", "checkpoint.every_steps=20",
         "checkpoint.keep_last=20", "log.progress=lines", "log.trackers=[mlflow]"]
STEPS = 80


class MlflowServer:
    """`mlflow server` on a SQLite file, in its own process group (so that killing it kills its workers)."""

    def __init__(self, root: Path):
        self.root = root
        self.proc = None
        self.uri = ""

    def start(self) -> None:
        port = free_port()
        self.uri = f"http://127.0.0.1:{port}"
        log = open(self.root / "server.log", "ab")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--default-artifact-root", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 300  # 28-57 s measured on a loaded 2-core machine
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.read().strip() == b"OK":
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server not ready in 300 s\n{(self.root / 'server.log').read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)


@pytest.fixture(scope="session")
def server_process(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def mlflow_server(server_process):
    """The session's server, started again if a test killed it."""
    if server_process.proc.poll() is not None:
        server_process.start()
    return server_process


def env_for(tmp_path: Path, uri: str, **extra) -> dict:
    # The one-worker SQLite server may stall for seconds on a loaded machine; the runner's own 10 s limit
    # (for servers that hang) would then give the tracker up. A refused connection still fails at once.
    return clean_env(tmp_path, MLFLOW_TRACKING_URI=uri, HOME=tmp_path / "home", MLFLOW_HTTP_REQUEST_TIMEOUT=60,
                     **extra)


def the_run(server: MlflowServer, run_name: str):
    """The one MLflow run named after the run directory (failing if there are several)."""
    client = server.client()
    experiment = client.get_experiment_by_name("runner")
    found = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    assert len(found) == 1, f"{len(found)} MLflow runs named {run_name}"
    return found[0]


def start(args: list[str], tmp_path: Path, env: dict, launcher: list[str] | None = None) -> Background:
    return Background((launcher or [PYTHON]) + [str(REPO / "runner/train.py"), *args,
                                                f"run.root={tmp_path / 'runs'}"], tmp_path, env)


def logged_step(run_dir: Path) -> int:
    return max((r["step"] for r in records_so_far(run_dir)), default=0)


def newest_checkpoint(run_dir: Path) -> int:
    saved = checkpoints(run_dir)
    return int(saved[-1].name.split("_")[1]) if saved else 0


def unsaved_train_point(run_dir: Path, after: int) -> bool:
    """A checkpoint newer than step `after` is saved, and a train point after it has reached the trackers (a
    later record follows it: metrics.jsonl is written before the trackers are told)."""
    saved = newest_checkpoint(run_dir)
    records = records_so_far(run_dir)
    return saved > after and any(r["split"] == "train" and r["step"] > saved for r in records[:-1])


@pytest.mark.slow
def test_one_mlflow_run_across_sigusr1_kill9_and_another_world_size(mlflow_server, tmp_path):
    run_dir = tmp_path / "runs" / "tracked"
    # A train point every 4 steps (and at each checkpoint, so that no log window straddles one): the points
    # re-logged after the kill -9 equal the first ones.
    args, env = TRAIN + ["run.name=tracked", "log.every_steps=4"], env_for(tmp_path, mlflow_server.uri)
    # Segment 1: stopped by SIGUSR1 (a preemption) after step 5.
    first = start(args, tmp_path, env)
    first.wait_for(lambda: logged_step(run_dir) >= 5, 240, "step 5")
    first.proc.send_signal(signal.SIGUSR1)
    assert first.wait(120) == 75, first.tail()
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    assert mlflow_server.client().get_run(run_id).info.status == "KILLED"
    # Segment 2: killed -9 after a train point that its newest checkpoint does not hold, so that the next
    # segment logs that step again. A kill that lands just after another checkpoint is followed by another try
    # (the window is the 12 steps between the second train point after a checkpoint and the next one).
    for _ in range(2):
        resumed_at = newest_checkpoint(run_dir)
        second = start(args, tmp_path, env)
        second.wait_for(lambda: unsaved_train_point(run_dir, resumed_at), 240, "a train point after a checkpoint",
                        every=0.01)
        second.proc.kill()
        second.wait(60)
        if unsaved_train_point(run_dir, resumed_at):
            break
    else:
        raise AssertionError("both kills -9 landed just after a checkpoint")
    # Segment 3: two processes finish the run.
    third = start(args, tmp_path, env, launcher=torchrun(2))
    assert third.wait(400) == 0, third.tail()
    assert "resumed from" in third.output and "Traceback" not in third.output, third.tail()

    run = the_run(mlflow_server, "tracked")
    client = mlflow_server.client()
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/loss")
    records = {r["step"]: r["metrics"]["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"}
    assert sorted({m.step for m in history}) == sorted(records), "the same points as metrics.jsonl, to the last"
    assert set(range(4, STEPS + 1, 4)) <= set(records)
    by_step: dict[int, list] = {}
    for m in history:
        by_step.setdefault(m.step, []).append(m.value)
    assert any(len(values) > 1 for values in by_step.values()), "the steps after the kill -9 are logged again"
    # The same values (a re-logged step may come from the 2-process segment: equal up to float rounding).
    for step, values in by_step.items():
        assert values == pytest.approx([records[step]] * len(values), rel=1e-5), step
    config = flatten(yaml.safe_load((run_dir / "config.yaml").read_text()))
    expected = {k: str(v) for k, v in config.items()}
    assert run.data.params == expected
    assert {a.path for a in client.list_artifacts(run_id)} >= {"summary.json", "config.yaml", "curves.png"}
    assert "best_val/accuracy" in run.data.metrics and "final_test/accuracy" in run.data.metrics


@pytest.mark.slow
def test_an_unreachable_tracker_is_one_line_before_training(tmp_path):
    nobody = f"http://127.0.0.1:{free_port()}"
    env = env_for(tmp_path, nobody)
    args = TRAIN + ["run.name=nowhere", "train.max_steps=4", "log.plot=false", f"run.root={tmp_path / 'runs'}"]
    result = subprocess.run([PYTHON, str(REPO / "runner/train.py"), *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and "mlflow cannot be reached" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "log.tracker_errors=warn" in lines[0]
    assert not (tmp_path / "runs" / "nowhere" / "metrics.jsonl").exists(), "nothing trained"
    warned = subprocess.run([PYTHON, str(REPO / "runner/train.py"), *args, "log.tracker_errors=warn"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert warned.returncode == 0, warned.stderr[-3000:]
    warnings = [line for line in warned.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "mlflow cannot be reached" in warnings[0], warned.stderr
    assert "mlflow missed steps 1-4 " in warned.stdout, warned.stdout[-2000:]


@pytest.mark.slow
def test_an_unreachable_tracker_refuses_before_an_overwrite_deletes_anything(tmp_path):
    """resume=none run.overwrite=true deletes the run's checkpoints and records, but only for a run that
    starts: with the tracker down the start is refused first, and the directory stays as it was."""
    args = TRAIN + ["run.name=kept", "train.max_steps=4", "log.plot=false", f"run.root={tmp_path / 'runs'}"]
    first = subprocess.run([PYTHON, str(REPO / "runner/train.py"), *args, "log.trackers=[]"], cwd=REPO,
                           env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "kept"
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    assert "summary.json" in before and any(p.startswith("checkpoints/step_") for p in before), before
    nobody = env_for(tmp_path, f"http://127.0.0.1:{free_port()}")
    again = subprocess.run([PYTHON, str(REPO / "runner/train.py"), *args, "resume=none", "run.overwrite=true"],
                           cwd=REPO, env=nobody, capture_output=True, text=True, timeout=300)
    lines = error_lines(again.stderr)
    assert again.returncode == 2 and len(lines) == 1 and "mlflow cannot be reached" in lines[0], again.stderr
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before, "nothing deleted"


@pytest.mark.slow
def test_a_run_that_stops_on_an_error_marks_its_mlflow_run_failed(mlflow_server, tmp_path):
    """A non-finite loss ends the run with exit 2: its MLflow run is FAILED, not left RUNNING."""
    args = TRAIN + ["run.name=diverged", "optim.lr=1e38", "log.plot=false", f"run.root={tmp_path / 'runs'}"]
    result = subprocess.run([PYTHON, str(REPO / "runner/train.py"), *args], cwd=REPO,
                            env=env_for(tmp_path, mlflow_server.uri), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "non-finite training loss" in result.stderr, result.stderr[-3000:]
    assert the_run(mlflow_server, "diverged").info.status == "FAILED"


def test_a_fast_dev_run_needs_no_tracker_server(train_main, monkeypatch):
    """A fast_dev_run starts no tracker, so log.trackers=[mlflow] without a server is no error there."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = train_main(["--config", "digits", "train.fast_dev_run=2", "log.trackers=[mlflow]", "log.plot=false"])
    assert result.returncode == 0, result.stderr[-3000:]
    refused = train_main(["--config", "digits", "train.max_steps=2", "log.trackers=[mlflow]", "log.plot=false"])
    assert refused.returncode == 2 and "needs a server" in refused.stderr


@pytest.mark.slow
def test_a_server_killed_mid_run_leaves_the_run_finishing(mlflow_server, tmp_path):
    run_dir = tmp_path / "runs" / "orphan"
    launch = start(TRAIN + ["run.name=orphan", "log.plot=false"], tmp_path, env_for(tmp_path, mlflow_server.uri))
    launch.wait_for(lambda: logged_step(run_dir) >= 5, 240, "step 5")
    mlflow_server.kill()
    killed_after = logged_step(run_dir)
    assert launch.wait(300) == 0, launch.tail()
    warnings = [line for line in launch.lines if line.startswith("warning: ")]
    assert len(warnings) == 1 and "mlflow stopped answering" in warnings[0], launch.tail()
    assert "Traceback" not in launch.output
    train_steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert train_steps == list(range(1, STEPS + 1)), "metrics.jsonl stays complete"
    missed = next(line for line in launch.lines if line.startswith("mlflow missed steps "))
    first_missed = int(missed.split()[3].split("-")[0])
    assert 5 <= first_missed <= killed_after + 1 and missed.split()[3] == f"{first_missed}-{STEPS}", missed


@pytest.mark.slow
def test_wandb_offline_keeps_one_run_id_across_segments(tmp_path):
    env = clean_env(tmp_path, WANDB_MODE="offline", HOME=tmp_path / "home", WANDB_SILENT="true")
    args = ["--config", "digits", "train.epochs=1", "log.trackers=[wandb]", "log.plot=false", "run.name=wb",
            f"run.root={tmp_path / 'runs'}", "log.progress=lines"]
    for max_steps in (3, 6):  # a max_steps stop, then the same run continued
        result = subprocess.run([PYTHON, str(REPO / "runner/train.py"), *args, f"train.max_steps={max_steps}"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "wb"
    wandb_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"]
    segments = sorted((run_dir / "tracking" / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith(f"-{wandb_id}") for s in segments), segments
    assert all((s / f"run-{wandb_id}.wandb").is_file() for s in segments)
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert resume_steps(records) == [3], "curves.png marks where the second segment took over"


def test_train_loss_is_the_mean_over_the_log_window(train_main):
    """log.every_steps=5 logs at step 5k the mean of the losses of steps 5k-4 .. 5k, which a run logging
    every step shows one by one; the default logs about 100 points."""
    args = ["--config", "digits", "train.epochs=1", "train.limit_train_steps=20", "log.trackers=[]",
            "log.plot=false", "checkpoint.keep_last=1"]
    assert train_main(args + ["run.name=every1", "log.every_steps=1"]).returncode == 0
    assert train_main(args + ["run.name=every5", "log.every_steps=5"]).returncode == 0
    result = train_main(args + ["run.name=auto", "train.global_batch_size=4", "train.limit_train_steps=250"])
    assert result.returncode == 0, result.stderr
    runs = result.run_root
    each = {r["step"]: r["metrics"]["loss"] for r in read_jsonl(runs / "every1" / "metrics.jsonl")
            if r["split"] == "train"}
    windows = {r["step"]: r["metrics"]["loss"] for r in read_jsonl(runs / "every5" / "metrics.jsonl")
               if r["split"] == "train"}
    assert list(windows) == [5, 10, 15, 20]
    for step, loss in windows.items():
        assert loss == pytest.approx(sum(each[s] for s in range(step - 4, step + 1)) / 5, rel=1e-6), step
    auto = [r["step"] for r in read_jsonl(runs / "auto" / "metrics.jsonl") if r["split"] == "train"]
    assert auto == list(range(2, 251, 2)), "250 steps: a point every 2 steps"
