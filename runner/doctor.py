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
# for the other ranks, so that it names the ranks that did not join; its start-up may overrun by the grace.
LATE_JOIN_WAIT_S, STARTUP_GRACE_S = 2.0, 10.0

if __package__ in (None, ""):  # run as a script: import this repo's packages, not runner/*.py as top level
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
from collections import defaultdict  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import timedelta  # noqa: E402

from runner.cli import Command, say_error  # noqa: E402
from runner.errors import EXIT_LOST_RANK, UserError, first_line  # noqa: E402

# torch is imported inside the functions that use it: `--help` and bad flags are answered without it, and
# run() sets TORCH_CPP_LOG_LEVEL and arms the watchdog before torch loads.

EXIT_CHECK_FAILED = 1
SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_STEP_ID", "SLURM_PROCID",
              "SLURM_LOCALID", "SLURM_NODEID", "SLURMD_NODENAME", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
              "SLURM_JOB_NODELIST", "SLURM_CPUS_PER_TASK", "SLURM_GPUS_ON_NODE", "SLURM_RESTART_COUNT")
VERSION_KEYS = ("python", "torch", "accelerate", "nccl")
UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}


# ---------------------------------------------------------------------------------------------- who am I

@dataclass
class Launch:
    rank: int
    world: int
    local_rank: int
    local_world: int | None   # what the launcher says runs on this node, when it says
    node_rank: int
    master_addr: str
    master_port: int
    launcher: str


def first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or ""
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        hosts = []
    return hosts[0] if hosts else "127.0.0.1"


def env_int(*names: str, default: int | None = None) -> int | None:
    for name in names:
        text = (os.environ.get(name) or "").split("(")[0]  # SLURM_TASKS_PER_NODE style "2(x3)"
        if text.strip():
            try:
                return int(text)
            except ValueError:
                raise UserError(f"{name}={os.environ[name]!r} is not an integer") from None
    return default


def detect_launch() -> Launch:
    """The rank layout from the launcher's variables: torch's own, else Slurm's, else one process."""
    node_rank = env_int("GROUP_RANK", "NODE_RANK", "SLURM_NODEID", default=0)
    if "RANK" in os.environ:
        launcher = ("torchrun/accelerate" if os.environ.get("TORCHELASTIC_RUN_ID")
                    else "srun + slurm_task.sh" if os.environ.get("SLURM_PROCID") else "environment")
        addr, port = os.environ.get("MASTER_ADDR"), env_int("MASTER_PORT")
        if not addr or port is None:
            raise UserError("RANK is set but MASTER_ADDR or MASTER_PORT is not; launch with torchrun, accelerate "
                            "launch or launch/slurm_task.sh, or set both")
        return Launch(env_int("RANK"), env_int("WORLD_SIZE", default=1), env_int("LOCAL_RANK", default=0),
                      env_int("LOCAL_WORLD_SIZE"), node_rank, addr, port, launcher)
    if "SLURM_PROCID" in os.environ and "SLURM_JOB_ID" in os.environ:
        # Bare `srun python runner/doctor.py`: the same rules as launch/slurm_task.sh.
        return Launch(env_int("SLURM_PROCID"), env_int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1),
                      env_int("SLURM_LOCALID", default=0), None, node_rank,
                      os.environ.get("RUNNER_MASTER_ADDR") or first_slurm_host(),
                      env_int("RUNNER_MASTER_PORT", default=10000 + env_int("SLURM_JOB_ID") % 20000), "srun")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Launch(0, 1, 0, 1, 0, "127.0.0.1", port, "single process")


def use_gpu(backend: str) -> bool:
    import torch

    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return backend != "gloo" and not forced_cpu and torch.cuda.is_available()


def versions(gpu: bool) -> dict:
    import torch

    nccl = "-"
    if gpu:
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError):
            nccl = "unavailable"
    try:
        accelerate = importlib.metadata.version("accelerate")
    except importlib.metadata.PackageNotFoundError:
        accelerate = "not installed"
    return {"python": platform.python_version(), "torch": torch.__version__, "accelerate": accelerate,
            "nccl": nccl}


def rank_report(launch: Launch, backend: str, gpu: bool, master_ms: float | None) -> dict:
    import torch

    device = f"cuda:{launch.local_rank % max(1, torch.cuda.device_count())}" if gpu else "cpu"
    if gpu:
        device += f" {torch.cuda.get_device_name(int(device.split(':')[1]))}"
    host = socket.gethostname()
    return {
        "rank": launch.rank, "world": launch.world, "local_rank": launch.local_rank,
        "local_world": launch.local_world, "node_rank": launch.node_rank, "host": host,
        "node": os.environ.get("SLURMD_NODENAME") or host, "pid": os.getpid(), "device": device,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"), "backend": backend,
        "versions": versions(gpu), "slurm": {k: os.environ[k] for k in SLURM_KEYS if k in os.environ},
        "master_ms": master_ms, "launcher": launch.launcher,
    }


# ---------------------------------------------------------------------------------------------- watchdog

class Watchdog:
    """Ends this process when one phase (joining, one collective) outlasts the timeout: gloo and NCCL do
    not honour their own timeout in every situation, and a doctor that hangs is worse than none."""

    def __init__(self, seconds: float, rank: int):
        self.seconds, self.rank = seconds, rank
        self.timer: threading.Timer | None = None

    def arm(self, failure: str, seconds: float | None = None) -> None:
        """From now on, `failure` (what did not happen) ends the process after `seconds` (default: the timeout)."""
        self.disarm()
        self.timer = threading.Timer(self.seconds if seconds is None else max(0.0, seconds), self.fire, [failure])
        self.timer.daemon = True
        self.timer.start()

    def disarm(self) -> None:
        if self.timer:
            self.timer.cancel()

    def fire(self, failure: str) -> None:
        say_error(failure, self.rank)
        os._exit(EXIT_LOST_RANK)


# ---------------------------------------------------------------------------------------------- joining

class Verdict(Exception):
    """How the doctor ends when it ends early: the exit code and the one error line (None: say nothing)."""

    def __init__(self, code: int, line: str | None):
        super().__init__(line)
        self.code, self.line = code, line


def connect_store(launch: Launch, host: bool, seconds: float, unreachable: str):
    """The check-in store: rank 0 hosts it at MASTER_ADDR:MASTER_PORT, unless a torchrun agent already
    serves there (then every rank is a client), as torch's own env:// rendezvous does."""
    import torch.distributed as dist

    try:
        store = dist.TCPStore(launch.master_addr, launch.master_port, None, host,
                              timedelta(seconds=max(seconds, 0.5)), wait_for_workers=False, multi_tenant=host)
    except (RuntimeError, ValueError, OSError) as e:
        if host:
            raise Verdict(EXIT_LOST_RANK, f"check 'master address reachable' failed: rank 0 on "
                                          f"{socket.gethostname()} cannot serve at {launch.master_addr}:"
                                          f"{launch.master_port}: {first_line(e)}") from None
        raise Verdict(EXIT_LOST_RANK, unreachable) from None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"runner-doctor/{attempt}/", store)


def wait_for_master(launch: Launch, deadline: float) -> float | None:
    """Milliseconds to open a TCP connection to the master address, retried until the deadline (rank 0 may
    start later); None when it cannot be reached. Plain sockets, so the wait ends on time: TCPStore's own
    connect blocks in C++ and overruns its timeout."""
    while True:
        begun = time.perf_counter()
        try:
            with socket.create_connection((launch.master_addr, launch.master_port),
                                          timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return 1000 * (time.perf_counter() - begun)
        except OSError:
            if time.monotonic() + 0.2 >= deadline:
                return None
            time.sleep(0.2)


def collect_reports(store, world: int, deadline: float) -> tuple[dict[int, dict], dict[int, int]]:
    """Rank 0 waits until every rank has checked in or the deadline passes: (reports, claims per rank)."""
    reports: dict[int, dict] = {}
    while True:
        for r in range(world):
            if r not in reports and store.check([f"report/{r}"]):
                reports[r] = json.loads(store.get(f"report/{r}"))
        if len(reports) == world or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    claims = {r: int(store.add(f"claim/{r}", 0)) for r in reports}
    return reports, claims


def announce(store, verdict: dict, joined: int, seconds: float = 5.0) -> None:
    """Rank 0 publishes its verdict and, since it hosts the store, waits briefly until the others read it."""
    store.set("verdict", json.dumps(verdict))
    deadline = time.monotonic() + seconds
    while int(store.add("verdict_read", 0)) < joined - 1 and time.monotonic() < deadline:
        time.sleep(0.05)


def await_verdict(store, rank: int) -> dict:
    try:
        store.wait(["verdict"], timedelta(days=1))  # the watchdog bounds this wait
        verdict = json.loads(store.get("verdict"))
        store.add("verdict_read", 1)
    except RuntimeError as e:
        raise Verdict(EXIT_LOST_RANK, f"check 'all ranks joined' failed: rank {rank} lost the master before "
                                      f"its verdict ({first_line(e)})") from None
    return verdict


# ---------------------------------------------------------------------------------------------- checks

def rank_list(ranks) -> str:
    """`0-3,6` from a set of ranks."""
    ranks, parts, start = sorted(ranks), [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ",".join(parts)


def node_key(report: dict) -> str:
    """A node: its host name, plus its node rank when several nodes share one host (emulated nodes)."""
    return f"{report['node']}#{report['node_rank']}"


def node_name(report: dict) -> str:
    return report["node"] if report["node"] != report["host"] else f"{report['host']} (node {report['node_rank']})"


def check_world(reports: dict[int, dict], claims: dict[int, int], world: int) -> list[str]:
    failures = []
    other = {r: p["world"] for r, p in reports.items() if p["world"] != world}
    if other:
        failures.append("check 'launched ranks = world size' failed: rank 0 has world size "
                        f"{world} but " + ", ".join(f"rank {r} on {node_name(reports[r])} has {w}"
                                                    for r, w in sorted(other.items())))
    twice = sorted(r for r, n in claims.items() if n > 1)
    if twice:
        failures.append(f"check 'launched ranks = world size' failed: rank {rank_list(twice)} was launched "
                        f"more than once ({sum(claims.values())} processes for world size {world})")
    return failures


def check_nodes(reports: dict[int, dict]) -> list[str]:
    """Ranks per node against GPUs (or the launcher's local world size), and duplicate local ranks."""
    failures, by_node = [], defaultdict(list)
    for report in reports.values():
        by_node[node_key(report)].append(report)
    for ranks in by_node.values():
        name, count = node_name(ranks[0]), len(ranks)
        gpus = max(p["gpus"] for p in ranks)
        uses_gpu = any(p["device"].startswith("cuda") for p in ranks)
        if uses_gpu and count > gpus:
            failures.append(f"check 'ranks per node = GPUs per node' failed: {count} ranks on {name} share "
                            f"{gpus} visible GPU(s)")
        expected = {p["local_world"] for p in ranks if p["local_world"] is not None}
        if expected and expected != {count}:
            failures.append(f"check 'ranks per node' failed: the launcher on {name} expects "
                            f"{'/'.join(map(str, sorted(expected)))} local ranks but {count} joined")
        local = defaultdict(list)
        for p in ranks:
            local[p["local_rank"]].append(p["rank"])
        for local_rank, same in sorted(local.items()):
            if len(same) > 1:
                failures.append(f"check 'unique (host, local rank)' failed: ranks {rank_list(same)} on {name} "
                                f"all have local rank {local_rank}")
    return failures


def check_versions(reports: dict[int, dict]) -> list[str]:
    failures = []
    for key in VERSION_KEYS:
        seen = defaultdict(set)
        for p in reports.values():
            seen[p["versions"][key]].add(node_name(p))
        if len(seen) > 1:
            detail = "; ".join(f"{v} on {', '.join(sorted(hosts))}" for v, hosts in sorted(seen.items()))
            failures.append(f"check 'equal versions' failed: {key} differs: {detail}")
    return failures


def check_master(reports: dict[int, dict], launch: Launch) -> list[str]:
    unreachable = sorted(r for r, p in reports.items() if p["master_ms"] is None)
    if unreachable:
        hosts = sorted({node_name(reports[r]) for r in unreachable})
        return [f"check 'master address reachable' failed: {launch.master_addr}:{launch.master_port} cannot be "
                f"reached from rank {rank_list(unreachable)} on {', '.join(hosts)}"]
    return []


def run_checks(reports: dict[int, dict], claims: dict[int, int], launch: Launch) -> list[str]:
    return (check_world(reports, claims, launch.world) + check_nodes(reports) + check_versions(reports)
            + check_master(reports, launch))


# ---------------------------------------------------------------------------------------------- printing

def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ranks_table(reports: dict[int, dict]) -> str:
    header = ["rank", "local", "world", "node", "host", "device", "GPUs (CUDA_VISIBLE_DEVICES)", "backend",
              "torch", "accelerate", "nccl", "master ms"]
    rows = [[r, p["local_rank"], p["world"], p["node_rank"], p["node"], p["device"],
             f"{p['gpus']} ({p['cuda_visible'].strip('()')})", p["backend"], p["versions"]["torch"],
             p["versions"]["accelerate"], p["versions"]["nccl"],
             "unreachable" if p["master_ms"] is None else f"{p['master_ms']:.1f}"]
            for r, p in sorted(reports.items())]
    text = format_table(header, rows)
    slurm = [[r, " ".join(f"{k.removeprefix('SLURM_')}={v}" for k, v in p["slurm"].items())]
             for r, p in sorted(reports.items()) if p["slurm"]]
    if slurm:
        text += "\n\n" + format_table(["rank", "Slurm variables"], slurm)
    return text


def print_summary(reports: dict[int, dict], launch: Launch, failures: list[str]) -> None:
    nodes = {node_key(p) for p in reports.values()}
    print(f"doctor: {len(reports)} of {launch.world} ranks joined on {len(nodes)} node(s) "
          f"({launch.launcher}; master {launch.master_addr}:{launch.master_port}; python "
          f"{reports[min(reports)]['versions']['python']})", flush=True)
    print(ranks_table(reports), flush=True)
    print("\nchecks: " + ("all passed" if not failures else f"{len(failures)} failed"), flush=True)
    for failure in failures:
        print(f"  {failure}", flush=True)


# ---------------------------------------------------------------------------------------------- collectives

def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", str(text).upper())
    if not match:
        raise UserError(f"--max-size {text!r}: expected a size such as 64MB, 512KB or 0")
    return int(match.group(1)) * UNITS[match.group(2) + "B" if match.group(2) else ""]


def human_size(n: int) -> str:
    for unit in ("GB", "MB", "KB"):
        if n >= UNITS[unit] and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]} {unit}"
    return f"{n} B"


def message_sizes(max_size: int) -> list[int]:
    sizes, size = [], 2**10
    while size <= max_size:
        sizes.append(size)
        size *= 4
    return sizes


def timed(fn, iterations: int, device) -> float:
    """Seconds per call of fn on the slowest rank (every rank waits for the last one to finish)."""
    import torch
    import torch.distributed as dist

    fn()  # warm-up: connections and buffers are set up on first use
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begun = time.perf_counter()
    for _ in range(iterations):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = torch.tensor([time.perf_counter() - begun], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item() / iterations


def check_all_reduce(device, world: int) -> None:
    import torch
    import torch.distributed as dist

    values = torch.full((1024,), float(dist.get_rank() + 1), device=device)
    dist.all_reduce(values)
    expected = world * (world + 1) / 2
    if not torch.all(values == expected):
        raise Verdict(EXIT_CHECK_FAILED, f"check 'all-reduce result' failed: rank {dist.get_rank()} got "
                                         f"{values[0].item():g}, expected {expected:g}")


def stalled(what: str, timeout: float) -> str:
    return f"check '{what}' failed: not done within --timeout {timeout:g} s (another rank died or stalled)"


def benchmark(device, world: int, max_size: int, iterations: int, watchdog: Watchdog, main: bool) -> list[dict]:
    import torch
    import torch.distributed as dist

    watchdog.arm(stalled("barrier", watchdog.seconds))
    check_all_reduce(device, world)
    results = [{"op": "barrier", "bytes": 0, "iterations": iterations,
                "seconds": timed(dist.barrier, iterations, device)}]
    for size in message_sizes(max_size):
        watchdog.arm(stalled(f"all-reduce {human_size(size)}", watchdog.seconds))
        tensor = torch.zeros(size // 4, dtype=torch.float32, device=device)
        count = max(2, min(iterations, (256 * 2**20) // size))
        seconds = timed(lambda: dist.all_reduce(tensor), count, device)
        results.append({"op": "all_reduce", "bytes": size, "iterations": count, "seconds": seconds,
                        # nccl-tests' bus bandwidth: what each link carries in a ring all-reduce
                        "bus_gb_s": size / seconds * 2 * (world - 1) / world / 1e9 if world > 1 else None})
        if main:
            bus = results[-1]["bus_gb_s"]
            print(f"  {human_size(size):>6}  {count:5d}  {1e6 * seconds:12.1f}  "
                  f"{'-' if bus is None else f'{bus:.3g}':>9}", flush=True)
    watchdog.disarm()
    return results


# ---------------------------------------------------------------------------------------------- the command

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
