"""The collective benchmark: one all-reduce checked for its result, then all-reduces from 1 KB to --max-size
and a barrier timed on the slowest rank's clock, each bounded by the watchdog.

torch is imported inside the functions that use it (see runner/doctor.py).
"""
import re
import time

from runner.errors import UserError
from runner.preflight.verdict import EXIT_CHECK_FAILED, Verdict
from runner.preflight.watchdog import Watchdog, stalled

UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}


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
