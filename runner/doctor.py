"""Preflight check of a launch: do all ranks join, see what they should, and talk fast enough?

    python runner/doctor.py                                              # one process
    accelerate launch --multi_gpu --num_processes 2 runner/doctor.py     # (ACCELERATE_USE_CPU=1 on CPU)
    torchrun --nproc_per_node 8 runner/doctor.py
    sbatch -N2 --ntasks-per-node=4 --gpus-per-node=4 slurm/doctor.sbatch

Every rank reports its host, global and local rank, world size, device and visible GPUs, backend,
torch/accelerate/NCCL versions and the Slurm variables it sees. The main process prints one table of all
ranks, runs the checks (launched ranks against the world size, ranks per node against GPUs per node,
duplicate (host, local rank) pairs, equal versions, master address reachable), then times all-reduces
from 1 KB to --max-size (latency and bus bandwidth) and a barrier.

Flags:
  --timeout S      seconds for all ranks to join, and for any one collective (default 120)
  --max-size SIZE  largest all-reduce, e.g. 64MB (default), 1MB, 0 for none
  --iterations N   timed all-reduces per size, fewer for large sizes (default 20)
  --backend B      auto (default: nccl on GPUs, gloo on CPU), gloo or nccl

Exit codes: 0 healthy; 1 a check failed; 2 bad flags; 3 a rank never joined, the master was unreachable
or a collective stalled past --timeout. A failure ends with one `error:` line naming the missing ranks or
hosts and the check that failed. Ranks come from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
(torchrun, accelerate, launch/slurm_task.sh), else from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID under
srun, else a single process.
"""
import sys
import time
from pathlib import Path

STARTED = time.monotonic()  # --timeout counts from here, before the slow imports
MAX_TIMEOUT_S = 7 * 24 * 3600
# Rank 0 that took longer than a short --timeout to import torch still hosts the check-in and waits this long
# for the other ranks, so that it names the ranks that did not join; its start-up may overrun by the grace
# (importing torch took up to 8 s on a loaded 2-core machine; only a rank 0 stuck for longer blames itself).
LATE_JOIN_WAIT_S, STARTUP_GRACE_S = 2.0, 30.0

if __package__ in (None, ""):  # run as a script: import this repo's packages, not runner/*.py as top level
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
from datetime import timedelta  # noqa: E402

from runner.cli import Command, say_error  # noqa: E402
from runner.errors import EXIT_LOST_RANK, UserError  # noqa: E402
from runner.preflight.checkin import (announce, await_verdict, collect_reports, connect_store,  # noqa: E402
                                      wait_for_master)
from runner.preflight.checks import rank_list, run_checks  # noqa: E402
from runner.preflight.collectives import benchmark, parse_size  # noqa: E402
from runner.preflight.launch import Launch, detect_launch, rank_report, use_gpu  # noqa: E402
from runner.preflight.summary import print_summary  # noqa: E402
from runner.preflight.verdict import EXIT_CHECK_FAILED, Verdict  # noqa: E402
from runner.preflight.watchdog import Watchdog, stalled  # noqa: E402

# torch is imported inside the functions that use it, here and in runner/preflight/: `--help` and bad flags are
# answered without it, and run() sets TORCH_CPP_LOG_LEVEL and arms the watchdog before torch loads.


def run(options: dict, overrides: list) -> int:
    if overrides:
        raise UserError(f"unknown argument {overrides[0][0]}={overrides[0][1]}; see --help")
    timeout = positive_number(options.get("--timeout", "120"), "--timeout", MAX_TIMEOUT_S)
    max_size = parse_size(options.get("--max-size", "64MB"))
    iterations = int(positive_number(options.get("--iterations", "20"), "--iterations", 1e6))
    backend = options.get("--backend", "auto")
    if backend not in ("auto", "gloo", "nccl"):
        raise UserError(f"--backend {backend!r}: expected auto, gloo or nccl")
    if not options.get("--debug"):
        # c10d logs every failed connection attempt with a C++ stack trace; the doctor says it in one line.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    launch = detect_launch()
    if not 0 <= launch.rank < launch.world:
        raise UserError(f"rank {launch.rank} is outside world size {launch.world} (RANK/WORLD_SIZE or SLURM_PROCID/"
                        f"SLURM_NTASKS as the launcher set them)")
    watchdog = Watchdog(timeout, launch.rank)
    # Importing torch can itself take longer than a short timeout on a loaded machine. Rank 0 then still
    # checks who joined (see join), so that it names the rank that is missing rather than itself.
    grace = STARTUP_GRACE_S if launch.rank == 0 else 0.0
    watchdog.arm(f"check 'all ranks joined' failed: rank {launch.rank} on {socket.gethostname()} did not start "
                 f"within --timeout {timeout:g} s", STARTED + timeout + grace - time.monotonic())
    try:
        return diagnose(launch, backend, timeout, max_size, iterations, watchdog)
    except Verdict as verdict:
        if verdict.line:
            say_error(verdict.line, launch.rank)
        sys.stdout.flush()
        os._exit(verdict.code)  # a normal exit may block tearing down a half-joined group


def diagnose(launch: Launch, backend: str, timeout: float, max_size: int, iterations: int,
             watchdog: Watchdog) -> int:
    import torch
    import torch.distributed as dist

    gpu = use_gpu(backend)
    backend = "nccl" if gpu else "gloo"
    device = torch.device(f"cuda:{launch.local_rank % torch.cuda.device_count()}" if gpu else "cpu")
    if gpu:
        torch.cuda.set_device(device)
    store = join(launch, backend, gpu, timeout, watchdog)
    watchdog.arm(f"check 'process group' failed: init_process_group({backend}) not done within --timeout "
                 f"{timeout:g} s")
    dist.init_process_group(backend, store=dist.PrefixStore("group/", store), rank=launch.rank,
                            world_size=launch.world, timeout=timedelta(seconds=timeout))
    main = launch.rank == 0
    if main:
        print(f"\nall-reduce, {backend}, float32 sum over {launch.world} rank(s) (bus bandwidth as in nccl-tests)",
              flush=True)
        print(f"  {'size':>6}  {'iters':>5}  {'latency us':>12}  {'bus GB/s':>9}", flush=True)
    results = benchmark(device, launch.world, max_size, iterations, watchdog, main)
    if main:
        print(f"barrier: {1e6 * results[0]['seconds']:.1f} us\nhealthy: {launch.world} rank(s), all checks "
              f"passed in {time.monotonic() - STARTED:.1f} s", flush=True)
    watchdog.arm(stalled("shutdown", timeout))
    dist.destroy_process_group()
    watchdog.disarm()
    return 0


def join(launch: Launch, backend: str, gpu: bool, timeout: float, watchdog: Watchdog):
    """Check in on the store; rank 0 collects every report, runs the checks and tells the others the verdict.
    A rank 0 whose own start-up used up the timeout still waits a moment for the others to check in."""
    deadline = max(STARTED + timeout, time.monotonic() + LATE_JOIN_WAIT_S) if launch.rank == 0 else STARTED + timeout
    where = f"rank {launch.rank} on {socket.gethostname()}"
    master = f"{launch.master_addr}:{launch.master_port}"
    unreachable = (f"check 'master address reachable' failed: {where} could not reach the master at {master} "
                   f"within --timeout {timeout:g} s")
    watchdog.arm(unreachable, deadline - time.monotonic())
    hosts_store = launch.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    master_ms = None
    if not hosts_store:
        master_ms = wait_for_master(launch, deadline - 0.5)
        if master_ms is None:
            raise Verdict(EXIT_LOST_RANK, unreachable)
    store = connect_store(launch, hosts_store, deadline - time.monotonic() - 0.5, unreachable)
    if hosts_store:
        master_ms = wait_for_master(launch, time.monotonic() + 5)
    watchdog.arm(f"check 'all ranks joined' failed: {where} had no answer from rank 0 at {master} within "
                 f"--timeout {timeout:g} s", deadline - time.monotonic())
    report = rank_report(launch, backend, gpu, master_ms)
    store.add(f"claim/{launch.rank}", 1)
    store.set(f"report/{launch.rank}", json.dumps(report))
    if launch.rank != 0:
        verdict = await_verdict(store, launch.rank)
        if not verdict["ok"]:
            raise Verdict(verdict["code"], None)  # rank 0 says what failed
        return store
    reports, claims = collect_reports(store, launch.world, deadline - 0.5)
    missing = sorted(set(range(launch.world)) - set(reports))
    failures = run_checks(reports, claims, launch)
    if missing:
        failures.insert(0, f"check 'all ranks joined' failed: rank {rank_list(missing)} of world size "
                           f"{launch.world} never joined within --timeout {timeout:g} s (master "
                           f"{launch.master_addr}:{launch.master_port})")
    print_summary(reports, launch, failures)
    code = EXIT_LOST_RANK if missing else EXIT_CHECK_FAILED
    announce(store, {"ok": not failures, "code": code}, len(reports), max(0.5, deadline - time.monotonic()))
    if failures:
        raise Verdict(code, "; ".join(failures))
    return store


def positive_number(text: str, flag: str, most: float) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= most:  # also nan, inf and 1e309, which timers and sleeps cannot take
        raise UserError(f"{flag} {text!r}: expected a positive number of at most {most:g}")
    return value


COMMAND = Command(__doc__, {"--timeout": "value", "--max-size": "value", "--iterations": "value",
                            "--backend": "value"}, run)


def main(argv=None) -> int:
    return COMMAND.main(argv)


if __name__ == "__main__":
    sys.exit(main())
