"""Multi-process behaviour with real launchers and real gloo process groups on the CPU (no mocks).

Every launch here is tiny (digits or synthetic data, one thread per process), but process start-up
dominates: each worker imports torch, accelerate and torchmetrics. The world-size runs are shared by
several tests through a module fixture. The launch checks of runner/distributed.py (ranks that do not
meet, a launcher's precision) are here too.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest

from tests.dist_helpers import (TORCHRUN, Background, accelerate_config, checkpoints, error_lines, final_checkpoint,
                                machine, read_weights)
from tests.util import (BIN, DIGITS, DISK_ARGS, QUIET_LINES, REPO, RESUMABLE, SHORT_EPOCH, STOP_AT, clean_env,
                        free_port, last_weights, max_relative_difference, ok, read_jsonl, run_train, summary, torchrun)


LAUNCH = REPO / "launch"


# linear on digits: no dropout, no BatchNorm, no augmentation, so the world size must not matter
INVARIANT = ["--config", "digits", "train.epochs=2", "train.global_batch_size=64", "train.micro_batch_size=16",
             "train.seed=3", *QUIET_LINES]


METRICS = ("accuracy", "top5_accuracy", "precision", "recall", "f1", "samples")


@pytest.fixture(scope="module")
def world_runs(tmp_path_factory):
    """The same run on 1 process (accumulation 4), 2 through accelerate, 2 through torchrun and 4 processes
    (accumulation 1): {label: (run_dir, completed process)}."""
    tmp = tmp_path_factory.mktemp("worlds")
    launches = {
        "1": accelerate_config("cpu_1"),
        "2-accelerate": accelerate_config("cpu_multi"),
        "2-torchrun": torchrun(2),
        "4": accelerate_config("cpu_multi", "--num_processes", "4"),
    }
    runs = {}
    for label, launcher in launches.items():
        result = run_train(INVARIANT + [f"run.name=w{label}"], tmp, launcher=launcher, timeout=400)
        runs[label] = (tmp / "runs" / f"w{label}", ok(result, f"world {label}"))
    return runs


def run_part(train_main, tmp_path, processes: int, args: list[str]):
    """One process in-process (fast), several under torchrun."""
    if processes == 1:
        return ok(train_main(args))
    return ok(run_train(args, tmp_path, launcher=torchrun(processes)))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_digits_preset_ends_the_same_on_any_world_size(tmp_path, train_main, world):
    ok(train_main(DIGITS + SHORT_EPOCH + ["run.name=w1"]))
    ok(run_train(DIGITS + SHORT_EPOCH + [f"run.name=w{world}"], tmp_path, launcher=torchrun(world)))
    run_dir = tmp_path / "runs" / f"w{world}"
    difference = max_relative_difference(last_weights(run_dir), last_weights(tmp_path / "runs" / "w1"))
    print(f"digits preset, 1 vs {world} processes: max relative difference {difference:.3g}")
    assert difference <= 1e-5
    assert summary(run_dir)["world_size"] == world and summary(run_dir)["steps"] == 8


@pytest.mark.parametrize("case, first, then", [
    pytest.param("2 -> 1 processes", (2, 32), (1, 32), marks=pytest.mark.slow),
    pytest.param("1 -> 2 processes", (1, 32), (2, 32), marks=pytest.mark.slow),
    ("micro 32 -> 16", (1, 32), (1, 16)),
])
def test_resume_on_another_world_or_micro_batch_continues_the_trajectory(tmp_path, train_main, case, first, then):
    """(processes, micro batch): the first launch leaves a checkpoint at STOP_AT, the second resumes from it."""
    run_part(train_main, tmp_path, 1, RESUMABLE + ["train.micro_batch_size=32", "run.name=whole"])
    args = RESUMABLE + ["run.name=parts", "checkpoint.keep_last=10"]
    run_part(train_main, tmp_path, first[0], args + [f"train.micro_batch_size={first[1]}",
                                                     f"checkpoint.every_steps={STOP_AT}"])
    checkpoint = tmp_path / "runs" / "parts" / "checkpoints" / f"step_{STOP_AT:08d}"
    resumed = run_part(train_main, tmp_path, then[0], args + [f"train.micro_batch_size={then[1]}",
                                                              f"resume={checkpoint}"])
    assert f"resumed from {checkpoint}" in resumed.stdout, resumed.stdout[-3000:]
    run_dir = tmp_path / "runs" / "parts"
    assert summary(run_dir)["steps"] == 12 and summary(run_dir)["segments"] == 2
    difference = max_relative_difference(last_weights(run_dir), last_weights(tmp_path / "runs" / "whole"))
    print(f"resume {case}: max relative difference to the uninterrupted run {difference:.3g}")
    assert difference <= 1e-5


def test_srun_tasks_without_ranks_are_refused(tmp_path):
    """`srun -n2 python runner/train.py` would start two copies that each train on everything."""
    env = clean_env(tmp_path, SLURM_STEP_NUM_TASKS=2, SLURM_JOB_ID=4242, SLURM_PROCID=0)
    result = run_train(DISK_ARGS, tmp_path, env=env)
    assert result.returncode == 2 and "launch/slurm_task.sh" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_launcher_precision_must_agree_with_the_config(train_main, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    result = train_main(DISK_ARGS)
    assert result.returncode == 2 and "train.mixed_precision=bf16" in result.stderr
    agreed = train_main(DISK_ARGS + ["train.mixed_precision=bf16", "dist.allow_emulated_bf16=true"])
    assert agreed.returncode == 0 and "precision bf16" in agreed.stdout


@pytest.mark.slow
def test_a_rank_lost_during_a_save_is_a_lost_rank(tmp_path):
    port, run_dir = free_port(), tmp_path / "runs" / "saving"
    args = [str(REPO / "runner/train.py"), *DIGITS, "model.name=simple_cnn", "model.kwargs={width: 64, hidden: 512}",
            "train.epochs=100", "checkpoint.every_steps=1", "checkpoint.keep_last=1", "log.every_steps=1",
            "dist.timeout_s=30", "run.name=saving", f"run.root={tmp_path / 'runs'}"]
    nodes = [Background(machine(rank, 2, port) + args, tmp_path) for rank in range(2)]
    try:
        victim = nodes[1].worker(1, timeout=240)
        nodes[0].wait_for(lambda: any(" step 2/" in line for line in nodes[0].lines), 240, "training steps")
        nodes[0].wait_for(lambda: any((run_dir / "checkpoints").glob(".tmp-step_*")), 60, "a save in progress")
        victim.kill()
        rc = nodes[0].wait(90)
        assert rc is not None and rc != 0, nodes[0].tail()
        output = nodes[0].output
        print("\n".join(line for line in output.splitlines() if "error:" in line or "exitcode" in line))
        assert "another rank died" in output, output[-3000:]
        assert "cannot write checkpoint" not in output and "exitcode  : 2" not in output, output[-3000:]
        assert "exitcode  : 3" in output, output[-3000:]
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.slow
def test_launch_configs_parse_and_emulate_nodes_script_is_valid():
    """Every launch/*.yaml loads with accelerate's own reader; the emulation script passes `bash -n`."""

    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"cpu_1": ("NO", 1, "no"), "cpu_multi": ("MULTI_GPU", 2, "no"),
                "cpu_multi_bf16": ("MULTI_GPU", 2, "bf16"), "gpu_1": ("NO", 1, "no"),
                "gpu_1_bf16": ("NO", 1, "bf16"), "gpu_1_fp16": ("NO", 1, "fp16"),
                "gpu_multi": ("MULTI_GPU", 2, "no"), "gpu_multi_bf16": ("MULTI_GPU", 2, "bf16"),
                "gpu_multi_fp16": ("MULTI_GPU", 2, "fp16"), "multi_node": ("MULTI_GPU", 2, "no")}
    assert set(expected) <= {p.stem for p in LAUNCH.glob("*.yaml")}
    for name, (kind, processes, precision) in expected.items():
        cfg = load_config_from_file(str(LAUNCH / f"{name}.yaml"))
        assert (str(cfg.distributed_type.value), cfg.num_processes, cfg.mixed_precision) == (
            kind, processes, precision), name
    for path in LAUNCH.glob("*.yaml"):
        # MULTI_CPU without an mpirun hostfile silently starts ONE process (accelerate 1.15)
        assert str(load_config_from_file(str(path)).distributed_type.value) != "MULTI_CPU", path.name
    assert load_config_from_file(str(LAUNCH / "multi_node.yaml")).num_machines == 2
    script = LAUNCH / "emulate_nodes.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "no script given" in usage.stderr


@pytest.mark.slow
@pytest.mark.parametrize("label", ["2-accelerate", "2-torchrun"])
def test_two_processes_complete_and_only_the_main_process_writes(world_runs, label):
    run_dir, result = world_runs[label]
    s = summary(run_dir)
    assert s["world_size"] == 2 and s["stopped"] == "completed" and s["steps"] == 2 * (1295 // 64)  # the preset holds out val
    # console: one run header and one summary table, not one per rank
    assert result.stdout.count("| world 2 x cpu |") == 1, result.stdout
    # the linear net's step is far shorter than a gloo all-reduce: the header says so and suggests 1 process
    assert "communication-bound at 2 processes" in result.stdout and "1 process" in result.stdout
    assert result.stdout.count("completed after") == 1, result.stdout
    # metrics.jsonl: every record once, steps in order within each split
    lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(lines) == len(set(json.dumps({k: v for k, v in json.loads(x).items() if k != "time"},
                                            sort_keys=True) for x in lines)), "duplicated metrics records"
    records = read_jsonl(run_dir / "metrics.jsonl")
    for split in {r["split"] for r in records}:
        steps = [r["step"] for r in records if r["split"] == split]
        assert steps == sorted(set(steps)), (split, steps)
    assert [r["split"] for r in records].count("final_test") == 1
    # run files: one summary, one config, finished checkpoints only (no leftover .tmp-*)
    assert sorted(p.name for p in run_dir.glob("summary*")) == ["summary.json"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert final_checkpoint(run_dir).name == f"step_{s['steps']:08d}"


@pytest.mark.slow
def test_world_size_invariance(world_runs):
    """global 64 = 16 x 4 x 1 = 16 x 2 x 2 = 16 x 1 x 4: the same weights and the same metrics."""
    reference_dir, _ = world_runs["1"]
    reference = read_weights(final_checkpoint(reference_dir))
    ref_metrics = summary(reference_dir)["final"]["test"]
    assert summary(reference_dir)["world_size"] == 1
    for label, (run_dir, result) in world_runs.items():
        s = summary(run_dir)
        assert s["world_size"] == int(label[0]), label
        accumulation = {"1": 4, "2": 2, "4": 1}[label[0]]
        assert f"micro 16 x accumulation {accumulation} x world {label[0]} = global 64" in result.stdout
        weights = read_weights(final_checkpoint(run_dir))
        assert weights.keys() == reference.keys()
        for name, ref in reference.items():
            diff = (weights[name] - ref).abs().max().item()
            assert diff <= 1e-5 * ref.abs().max().item(), f"{label}: {name} differs by {diff}"
        metrics = s["final"]["test"]
        for key in METRICS:
            assert metrics[key] == ref_metrics[key], (label, key, metrics[key], ref_metrics[key])
        assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=1e-5), label


@pytest.mark.slow
def test_distributed_evaluation_is_exact(world_runs, tmp_path):
    """evaluate.py on 1, 2 and 3 processes: 359 test samples are not a multiple of world x 16.

    Fails while runner/metrics.py builds MetricCollection with torchmetrics' default compute_groups=True:
    top-1 and top-5 accuracy are merged into one group whenever their states happen to agree after the
    first batch (e.g. a first batch whose top-1 hits equal its top-5 hits), after which top5_accuracy
    silently reports top-1 accuracy. The first batch differs with the world size, so top5 does too."""
    run_dir, _ = world_runs["1"]
    checkpoint = final_checkpoint(run_dir)
    results = {}
    for n, launcher in ((1, None), (2, accelerate_config("cpu_multi")), (3, torchrun(3))):
        ok(run_train(["--checkpoint", str(checkpoint), "eval.batch_size=16"], tmp_path, launcher=launcher,
                     script="runner/evaluate.py"), f"evaluate on {n}")
        report = json.loads((run_dir / f"eval-{checkpoint.name}-test.json").read_text())
        assert report["world_size"] == n
        results[n] = report
    reference = results[1]["metrics"]
    assert reference["samples"] == 359
    mismatches = []
    for n, report in results.items():
        metrics = report["metrics"]
        assert sum(map(sum, report["confusion_matrix"])) == 359, n
        if report["confusion_matrix"] != results[1]["confusion_matrix"]:
            mismatches.append(f"{n} processes: confusion matrix")
        mismatches += [f"{n} processes: {key} {metrics[key]} != {reference[key]}" for key in METRICS
                       if metrics[key] != reference[key]]
        if abs(metrics["loss"] - reference["loss"]) > 1e-6:
            mismatches.append(f"{n} processes: loss {metrics['loss']} != {reference['loss']}")
    assert not mismatches, "distributed evaluation differs from 1 process: " + "; ".join(mismatches)
    # and the evaluation during training (1 process, eval.batch_size 256) agrees
    assert summary(run_dir)["final"]["test"]["accuracy"] == reference["accuracy"]


@pytest.mark.slow
def test_ranks_see_disjoint_shards(tmp_path):
    num_train, global_batch, micro, num_eval, world = 1000, 96, 16, 359, 3
    out = tmp_path / "probe"
    out.mkdir()
    result = ok(run_train([str(out), str(num_train), str(global_batch), str(micro), str(num_eval), "7"], tmp_path,
                          launcher=torchrun(world), script="tests/scripts/shard_probe.py"), "shard probe")
    ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in range(world)]
    assert [r["rank"] for r in ranks] == list(range(world)), result.stdout
    assert {r["world"] for r in ranks} == {r["env_world"] for r in ranks} == {world}
    assert {r["accumulation"] for r in ranks} == {global_batch // (micro * world)}
    steps = num_train // global_batch
    assert {r["steps_per_epoch"] for r in ranks} == {steps}
    permutation = ranks[0]["permutation"]
    assert all(r["permutation"] == permutation for r in ranks), "ranks disagree on the sample order"
    assert sorted(permutation) == list(range(num_train))
    seen = []
    for step in range(steps):
        per_rank = [set(r["train_steps"][step]) for r in ranks]
        assert all(len(s) == global_batch // world for s in per_rank)
        for a in range(world):
            for b in range(a + 1, world):
                assert not per_rank[a] & per_rank[b], f"step {step}: ranks {a} and {b} share samples"
        window = set(permutation[step * global_batch:(step + 1) * global_batch])
        assert set().union(*per_rank) == window, f"step {step}: the ranks do not cover the global batch"
        seen += [i for s in per_rank for i in s]
    assert len(seen) == len(set(seen)) == steps * global_batch  # each sample at most once per epoch
    # evaluation shards: contiguous, disjoint, covering the split exactly once
    bounds = [tuple(r["eval"]) for r in ranks]
    assert bounds[0][0] == 0 and bounds[-1][1] == num_eval
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(world - 1))
    assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


@pytest.mark.slow
def test_two_machines_complete_a_run_together(tmp_path):
    """launch/emulate_nodes.sh: two `accelerate launch --num_machines 2 --machine_rank 0|1 --main_process_ip
    127.0.0.1` on this host."""

    run_root = tmp_path / "runs"
    env = clean_env(tmp_path, ACCELERATE=BIN / "accelerate")
    result = subprocess.run(["bash", str(LAUNCH / "emulate_nodes.sh"), "-n", "2", "-l", str(tmp_path / "logs"),
                             str(REPO / "runner/train.py"), "--config", "digits", "train.epochs=1",
                             "train.limit_train_steps=4", "run.name=nodes", f"run.root={run_root}", *QUIET_LINES],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    logs = {i: (tmp_path / "logs" / f"node_{i}.log").read_text() for i in range(2)}
    assert result.returncode == 0, f"{result.stderr}\n--- node 0\n{logs[0][-3000:]}\n--- node 1\n{logs[1][-3000:]}"
    s = summary(run_root / "nodes")
    assert s["world_size"] == 2 and s["steps"] == 4 and s["stopped"] == "completed"
    assert "| world 2 x cpu |" in logs[0]
    assert "completed after" not in logs[1]  # machine 1 holds rank 1 only: it prints nothing


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_lost_rank_on_other_machine_does_not_hang_the_run(tmp_path, how):
    """Machine 1's only rank dies (SIGKILL) or hangs (SIGSTOP) mid-run. Machine 0's launcher cannot see it,
    so only the runner can end machine 0's rank: on the broken connection, or at dist.timeout_s."""
    timeout_s, port = 20, free_port()
    args = [str(REPO / "runner/train.py"), "--config", "digits", "data.name=synthetic",
            "data.synthetic_shape=[1,28,28]", "data.synthetic_size=4096", "train.epochs=1000", "log.every_steps=1",
            f"dist.timeout_s={timeout_s}", "run.name=lost", f"run.root={tmp_path / 'runs'}", *QUIET_LINES]
    nodes = [Background(machine(rank, 2, port) + args, tmp_path) for rank in range(2)]
    try:
        nodes[0].wait_for(lambda: any(" step 3/" in line for line in nodes[0].lines), 240, "training steps")
        victim = nodes[1].worker(1)
        victim.send_signal(getattr(signal, how))
        signalled = time.monotonic()
        rc = nodes[0].wait(timeout_s + 40)
        waited = time.monotonic() - signalled
        assert rc is not None, (f"machine 0 still running {waited:.0f} s after rank 1 got {how} "
                                f"(dist.timeout_s={timeout_s})\n{nodes[0].tail()}")
        assert rc != 0, nodes[0].tail()
        assert not (tmp_path / "runs" / "lost" / "summary.json").exists()
        if how == "SIGSTOP":
            assert waited >= timeout_s - 2, f"ended after {waited:.0f} s, before the collective timeout"
            assert "Timed out" in nodes[0].output or "timed out" in nodes[0].output, nodes[0].tail()
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.slow
def test_elastic_restart_resumes_from_the_last_checkpoint(tmp_path):
    """torchrun --max-restarts 1: SIGKILL a worker after a checkpoint exists; the group restarts, resumes
    and completes."""
    run_dir = tmp_path / "runs" / "elastic"
    total = 1000  # steps of ~4 ms: seconds between the first checkpoint and the last, for the kill to land
    # torch 2.15's agent keeps ONE TCPStore for the workers across restarts, with no per-attempt prefix, so a
    # restarted rank can read the dead attempt's gloo addresses ("Gloo connectFullMesh failed ... Connection
    # refused"; pytorch/pytorch#167288 is the NCCL twin). c10d rendezvous with the store sharing switched off
    # gives every restart round its own fresh store.
    launcher = [TORCHRUN, "--nnodes", "1", "--nproc_per_node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    env = clean_env(tmp_path, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
    launch = Background(launcher + [
        str(REPO / "runner/train.py"), "--config", "digits", "data.name=synthetic", "data.synthetic_shape=[1,28,28]",
        "data.synthetic_size=4096", "train.epochs=100", f"train.max_steps={total}", "eval.every_epochs=0",
        "checkpoint.every_steps=50", "checkpoint.every_epochs=0", "log.every_steps=50", "dist.timeout_s=30",
        "run.name=elastic", f"run.root={tmp_path / 'runs'}", *QUIET_LINES], tmp_path, env)
    try:
        ranks = [launch.worker(0), launch.worker(1)]
        launch.wait_for(lambda: bool(checkpoints(run_dir)), 240, "a first checkpoint")
        for rank in ranks:  # held still, so that the kill lands before the run's last checkpoint
            rank.send_signal(signal.SIGSTOP)
        assert not (run_dir / "summary.json").exists()
        before = int(checkpoints(run_dir)[-1].name.split("_")[1])
        assert before < total, "the run finished before the kill: make it longer"
        ranks[1].kill()
        ranks[0].send_signal(signal.SIGCONT)
        rc = launch.wait(300)
        assert rc == 0, f"launch ended with {rc}\n{launch.tail(120)}"
    finally:
        launch.stop()
    out = launch.output
    assert "resumed from" in out, out[-4000:]
    resumed = [line for line in out.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, resumed  # printed by the main process only, once
    resumed_step = int(resumed[0].split("step_")[1][:8])
    assert before <= resumed_step < total
    s = summary(run_dir)
    assert s["world_size"] == 2 and s["steps"] == total and s["stopped"] == "max_steps"
    # the history after the resume point was rewritten, not duplicated
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == total


@pytest.mark.slow
def test_world_larger_than_the_dataset_is_one_clear_error(tmp_path):
    result = run_train(["--config", "digits", "data.name=synthetic", "data.synthetic_size=1", "data.val_fraction=0",
                        "data.synthetic_shape=[1,28,28]", "train.micro_batch_size=1", "run.name=tiny", *QUIET_LINES],
                       tmp_path, launcher=torchrun(2), timeout=300)
    assert result.returncode != 0
    # the launcher reports each worker's own status: the runner's user-error code 2, not a crash
    assert "exitcode  : 2" in result.stderr and "exitcode  : 1 " not in result.stderr, result.stderr[-3000:]
    expected = ("world size 2 x train.micro_batch_size 1 = 2 samples per micro-step, but the training set holds "
                "only 1")
    errors = error_lines(result.stderr)
    # one message; the main process says it once, other ranks (if they print) prefix their rank
    assert {re.sub(r"^error: (\[rank \d+\] )?", "", line) for line in errors} == {expected}, result.stderr[-3000:]
    assert errors.count(f"error: {expected}") == 1, errors
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr


@pytest.mark.slow
def test_bf16_launch_config_with_matching_runner_setting_runs_bf16(tmp_path):
    result = ok(run_train(["--config", "digits", "train.fast_dev_run=2", "train.mixed_precision=bf16",
                                   "dist.allow_emulated_bf16=true", *QUIET_LINES],
                          tmp_path, launcher=accelerate_config("cpu_multi_bf16")), "cpu_multi_bf16")
    assert "| world 2 x cpu | precision bf16 |" in result.stdout


@pytest.mark.slow
def test_launch_precision_is_not_silently_dropped(tmp_path):
    """`accelerate launch --config_file launch/cpu_multi_bf16.yaml` (mixed_precision: bf16) without
    train.mixed_precision: the run must use bf16 or refuse with one line, never run fp32 quietly.

    The runner passes Accelerator(mixed_precision=train.mixed_precision), and an explicit value overrides
    the launcher's ACCELERATE_MIXED_PRECISION: without a check, the launch config's bf16/fp16 is dropped."""
    result = run_train(["--config", "digits", "train.fast_dev_run=2", *QUIET_LINES], tmp_path,
                       launcher=accelerate_config("cpu_multi_bf16"))
    used_bf16 = result.returncode == 0 and "precision bf16" in result.stdout
    refused = result.returncode != 0 and any("bf16" in line for line in error_lines(result.stderr))
    assert used_bf16 or refused, (f"the launcher asked for bf16, the run reported: "
                                  f"{[l for l in result.stdout.splitlines() if '| precision' in l]}")


@pytest.mark.slow
def test_dist_debug_turns_on_torch_debugging_and_says_where_dumps_go(tmp_path):
    """dist.debug=true on 2 ranks: the run still trains, and the header names the flight-recorder folder."""
    result = ok(run_train(["--config", "digits", "train.epochs=1", "train.limit_train_steps=2", "dist.debug=true",
                           "run.name=debug", *QUIET_LINES], tmp_path, launcher=torchrun(2)), "dist.debug")
    dumps = tmp_path / "runs" / "debug" / "flight_recorder"
    assert f"dumps on a collective timeout go to {dumps}/rank_<N>" in result.stdout, result.stdout[-2000:]
    assert dumps.is_dir()

