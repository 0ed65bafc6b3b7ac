"""Joining the ranks before any process group exists: every rank checks in on a TCP store at the master
address with its report, rank 0 collects the reports and tells the others its verdict.

torch is imported inside the functions that use it (see runner/doctor.py).
"""
import json
import os
import socket
import time
from datetime import timedelta

from runner.errors import EXIT_LOST_RANK, first_line
from runner.preflight.launch import Launch
from runner.preflight.verdict import Verdict


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
