"""The sbatch scripts under a real Slurm: a private cluster of two nodes, n1 and n2, on this host.

One module fixture submits four jobs at once, all on the same small `digits` run with 2 ranks (3 epochs of 161
steps):
  A  slurm/cpu.sbatch on 2 nodes, left alone: the uninterrupted reference;
  B  slurm/cpu.sbatch on 2 nodes, sent SIGUSR1 mid-epoch: it must checkpoint, requeue itself, resume and finish;
  C  slurm/multi_node_gpu.sbatch on 2 nodes, on CPU (one `accelerate launch` per node, ACCELERATE_USE_CPU=1);
  D  slurm/single_node_gpu.sbatch on 1 node, on CPU (one `accelerate launch` of 2 processes).
All four must end with the same weights, bit for bit. The whole module takes about 1.5-2.5 minutes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)
from tests.util import BIN, REPO, clean_env, read_jsonl, records_so_far, summary

pytestmark = pytest.mark.slurm

SCRIPTS = ["slurm/cpu.sbatch", "slurm/single_node_gpu.sbatch", "slurm/multi_node_gpu.sbatch"]
# 1295 training samples (the preset holds out val) / global batch 8 = 161 steps per epoch; 3 epochs, so
# that a fast machine cannot finish before the preemption signal arrives.
TRAIN_ARGS = ["--config", "digits", "train.epochs=3", "train.global_batch_size=8", "log.every_steps=5",
              "log.trackers=[]", "log.plot=false", "log.progress=lines", "checkpoint.keep_last=10"]
STEPS, STEPS_PER_EPOCH = 483, 161
JOB_TIMEOUT = 600  # seconds, per job, from submission (they take 40-130 s here, sharing the 2 cores)


class Job:
    def __init__(self, cluster, job_id: str, tmp: Path):
        self.cluster, self.id = cluster, job_id
        self.out = tmp / f"slurm-{job_id}.out"
        self.run_dir = tmp / "runs" / f"digits-{job_id}"   # default run name under Slurm: <config>-<job id>
        self.submitted = time.time()
        self.info: dict | None = None
        self.seconds = 0.0
        self.signalled_at_step = 0
        self.signal_error = ""

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else "(no output file)"

    def explain(self) -> str:
        tail = "\n".join(self.output().splitlines()[-40:])
        return f"job {self.id}: {self.info}\n--- output tail:\n{tail}\n--- daemon logs:\n{self.cluster.log_tail(8)}"

    def wait(self) -> dict:
        if self.info is None:
            left = JOB_TIMEOUT - (time.time() - self.submitted)
            self.info = self.cluster.wait(self.id, timeout=max(left, 1))
            try:  # submission to Slurm's end time (SubmitTime restarts at a requeue: use ours)
                end = datetime.fromisoformat(self.info["EndTime"])
                self.seconds = (end - datetime.fromtimestamp(self.submitted)).total_seconds()
            except (KeyError, ValueError):
                self.seconds = time.time() - self.submitted
        return self.info

    def final_weights(self) -> bytes:
        return (self.run_dir / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors").read_bytes()


def job_env(tmp: Path, **extra) -> dict:
    """What a user's shell would pass to sbatch: no accelerate config, this interpreter's venv on PATH."""
    venv = Path(sys.prefix)
    env = clean_env(tmp, RUNNER_DIR=REPO, **extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    if (venv / "bin" / "activate").exists():
        env["RUNNER_VENV"] = str(venv)
    return env


def gpus(cluster, n: int) -> list[str]:
    """sbatch options for n GPUs per node: stand-in GPUs if the cluster has them, else none."""
    return [f"--gpus-per-node={n if cluster.gpus_per_node else 0}"]


def gpu_env(cluster, tmp: Path, n: int) -> dict:
    env = job_env(tmp, ACCELERATE_USE_CPU=1)
    if not cluster.gpus_per_node:  # no stand-in GPUs: tell the script how many processes to start
        env["GPUS_PER_NODE"] = str(n)
    return env


def metrics_step(run_dir: Path) -> tuple[int, int]:
    """(step, epoch) of the newest train record in metrics.jsonl, (0, 0) before the first."""
    train = [r for r in records_so_far(run_dir) if r.get("split") == "train"]
    return (train[-1]["step"], train[-1]["epoch"]) if train else (0, 0)


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):  # noqa: F811
    cluster = slurm_cluster
    tmp = tmp_path_factory.mktemp("slurm_jobs")
    root = [f"run.root={tmp / 'runs'}"]
    common = ["-N2", "--ntasks-per-node=1", f"--output={tmp}/slurm-%j.out"]

    def submit(args: list[str], env: dict) -> Job:
        return Job(cluster, cluster.sbatch(args, env=env, cwd=REPO), tmp)

    jobs = {
        "reference": submit([*common, "slurm/cpu.sbatch", *TRAIN_ARGS, *root], job_env(tmp)),
        "preempted": submit([*common, "slurm/cpu.sbatch", *TRAIN_ARGS, *root], job_env(tmp)),
        # The GPU scripts on CPU: stand-in GPUs (the scripts size the launch from SLURM_GPUS_ON_NODE), the
        # processes forced onto the CPU (gloo), 1 core per task to fit here.
        "accelerate": submit([*common, *gpus(cluster, 1), "--cpus-per-task=1", "slurm/multi_node_gpu.sbatch",
                              *TRAIN_ARGS, "dist.threads=1", *root], gpu_env(cluster, tmp, 1)),
        "single_node": submit([*gpus(cluster, 2), "--cpus-per-task=1", f"--output={tmp}/slurm-%j.out",
                               "slurm/single_node_gpu.sbatch", *TRAIN_ARGS, "dist.threads=1", *root],
                              gpu_env(cluster, tmp, 2)),
    }
    try:
        # Preempt B mid-epoch: as soon as its metrics show a training step (they log every 5 of 161 per epoch).
        job = jobs["preempted"]
        deadline, next_check = time.time() + 150, time.time() + 2
        while True:
            step, epoch = metrics_step(job.run_dir)
            if step:
                break
            if time.time() > next_check:
                if not cluster.queued(job.id):
                    pytest.fail(f"job {job.id} ended before it could be preempted\n{job.explain()}")
                next_check = time.time() + 2
            if time.time() > deadline:
                pytest.fail(f"job {job.id} logged no training step within 150 s\n{job.explain()}")
            time.sleep(0.1)
        sent = subprocess.run(["scancel", "--signal=USR1", job.id], env=cluster.env(), capture_output=True,
                              text=True, timeout=30)
        job.signalled_at_step = step
        job.signal_error = sent.stderr.strip() if sent.returncode else ""
        yield jobs
    finally:
        for job in jobs.values():
            if cluster.queued(job.id):
                subprocess.run(["scancel", job.id], env=cluster.env(), timeout=30)


def check_completed(job: Job) -> None:
    info = job.wait()
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", job.explain()
    records = job.cluster.jobcomp_records(job.id)
    assert records and records[-1].get("JobState") == "COMPLETED", f"jobcomp: {records}\n{job.explain()}"


def check_run(job: Job) -> dict:
    result = summary(job.run_dir)
    assert result["world_size"] == 2 and result["steps"] == STEPS and result["stopped"] == "completed", result
    assert result["epochs_completed"] == 3
    metrics = read_jsonl(job.run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics if m["split"] == "train"][-1] == STEPS
    assert any(m["split"] == "final_test" for m in metrics)
    final = job.run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert (final / "manifest.json").is_file() and (final / "model.safetensors").is_file()
    assert json.loads((final / "manifest.json").read_text())["world_size"] == 2
    return result


def test_scripts_are_valid_bash_with_the_slurm_essentials():
    for name in SCRIPTS + ["launch/slurm_task.sh"]:
        path = REPO / name
        assert os.access(path, os.R_OK), name
        check = subprocess.run([shutil.which("bash") or "/bin/bash", "-n", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, f"{name}: {check.stderr}"
    for name in SCRIPTS:
        text = (REPO / name).read_text()
        directives = re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.M)
        assert "--requeue" in directives, name
        assert "--open-mode=append" in directives, name
        signal = [d for d in directives if d.startswith("--signal=")]
        # USR1 must reach the srun tasks (the training processes), not only the batch shell (B:USR1@...).
        assert len(signal) == 1 and re.fullmatch(r"--signal=USR1@\d+", signal[0]), f"{name}: {signal}"
        assert re.search(r"^srun --kill-on-bad-exit=1 ", text, flags=re.M), name
        assert "SLURM_SUBMIT_DIR" in text and ".venv" in text, name


def test_cpu_script_runs_two_ranks_on_two_nodes(jobs):
    job = jobs["reference"]
    check_completed(job)
    check_run(job)
    assert "2 tasks on n[1-2]" in job.output(), job.explain()
    assert job.wait().get("Restarts") == "0"
    print(f"2-node CPU job {job.id}: {job.seconds:.0f} s from submission to the end")


def test_preempted_job_checkpoints_requeues_and_resumes_bit_for_bit(jobs):
    job, reference = jobs["preempted"], jobs["reference"]
    assert not job.signal_error, f"scancel --signal=USR1 {job.id}: {job.signal_error}"
    check_completed(job)
    info = job.wait()
    assert info.get("Restarts") == "1", job.explain()
    output = job.output()
    assert "(restart 0)" in output and "(restart 1)" in output, job.explain()  # SLURM_RESTART_COUNT
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+): checkpoint saved", output)
    assert stopped and "requeueing Slurm job" in output, job.explain()
    step = int(stopped.group(1))
    assert step >= job.signalled_at_step
    checkpoint = job.run_dir / "checkpoints" / f"step_{step:08d}"
    assert f"resumed from {checkpoint} (epoch {step // STEPS_PER_EPOCH + 1}, step {step})" in output, job.explain()
    assert step < STEPS, "the signal came too late to interrupt anything"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    # Signalled mid-epoch; the checkpoint is mid-epoch too unless the signal's delay ran exactly to step 161.
    assert (manifest["epoch"], manifest["step_in_epoch"]) == divmod(step, STEPS_PER_EPOCH), manifest
    assert manifest["world_size"] == 2
    check_run(job)
    check_completed(reference)
    assert job.final_weights() == reference.final_weights(), (
        f"final weights of the preempted job {job.id} differ from the uninterrupted job {reference.id}")
    print(f"preempted job {job.id}: signal at step {job.signalled_at_step}, checkpoint at step {step}, "
          f"requeued and finished in {job.seconds:.0f} s from submission")


@pytest.mark.skipif(shutil.which("accelerate", path=str(BIN)) is None, reason="accelerate CLI not installed")
@pytest.mark.parametrize("name, layout", [
    ("accelerate", r"2 nodes x 1 processes on n\[1-2\], head n1:\d+"),   # multi_node_gpu.sbatch
    ("single_node", r"\): 2 processes on n[12] "),                      # single_node_gpu.sbatch
])
def test_gpu_scripts_launch_accelerate_and_match_the_reference(jobs, name, layout):
    job, reference = jobs[name], jobs["reference"]
    check_completed(job)
    check_run(job)
    assert re.search(layout, job.output()), job.explain()
    check_completed(reference)
    assert job.final_weights() == reference.final_weights(), (
        f"final weights of the {name} job {job.id} differ from the srun-per-rank job {reference.id}")
    print(f"{name} job {job.id}: {job.seconds:.0f} s from submission to the end")
