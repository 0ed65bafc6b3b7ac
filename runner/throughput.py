"""Throughput and efficiency: img/s, step time, time waiting for data, peak memory and MFU."""
from __future__ import annotations

import resource
import time

import torch

# Dense bf16/fp16 tensor-core peaks per device, for MFU when log.peak_tflops is not set.
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def device_peak_flops(device: torch.device, configured_tflops: float) -> float | None:
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory_per_rank(device: torch.device) -> list[float]:
    """Every rank's peak memory (MiB: the GPU allocator's peak, or the process's peak RSS on CPU), in rank
    order. A collective once a process group exists: every rank calls it at the same point."""
    mine = peak_memory_mb(device)
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    peaks = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
    peaks[dist.get_rank()] = mine
    dist.all_reduce(peaks)
    return peaks.tolist()


class Throughput:
    """Counts samples and time per log window and for the whole run (this process's view; every rank
    trains the same number of samples per step, so global img/s is per-device img/s x world size)."""

    def __init__(self, device: torch.device, world: int, flops_per_sample: float | None, peak_flops: float | None):
        self.device, self.world = device, world
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        self.total = {"samples": 0, "steps": 0, "seconds": 0.0, "data_seconds": 0.0}
        self.window = dict(self.total)
        self.running_since: float | None = None
        self.first_step_at: float | None = None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        self.running_since = time.perf_counter()

    def pause(self):
        """Stop the clock (evaluation and checkpoints are not training time)."""
        if self.running_since is not None:
            self.sync()
            elapsed = time.perf_counter() - self.running_since
            self.total["seconds"] += elapsed
            self.window["seconds"] += elapsed
            self.running_since = None

    def add_data_wait(self, seconds: float):
        self.total["data_seconds"] += seconds
        self.window["data_seconds"] += seconds

    def add_step(self, samples_per_rank: int):
        if self.first_step_at is None:
            self.first_step_at = time.time()
        for counts in (self.total, self.window):
            counts["samples"] += samples_per_rank
            counts["steps"] += 1

    def report(self, counts: dict) -> dict:
        seconds = max(counts["seconds"], 1e-9)
        per_device = counts["samples"] / seconds
        out = {
            "img_per_s": per_device * self.world,
            "img_per_s_per_device": per_device,
            "step_time_ms": 1000 * seconds / max(1, counts["steps"]),
            "data_wait_fraction": counts["data_seconds"] / seconds,
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        if self.flops_per_sample and self.peak_flops:
            out["mfu"] = per_device * self.flops_per_sample / self.peak_flops
        return out

    def take_window(self) -> dict:
        """Figures since the last call (the clock must be running; it keeps running)."""
        self.pause()
        report = self.report(self.window)
        self.window = {k: 0 if isinstance(v, int) else 0.0 for k, v in self.window.items()}
        self.start()
        return report

    def startup_seconds(self, process_started: float) -> float:
        """From the command's start to the end of the first optimizer step."""
        return (self.first_step_at or time.time()) - process_started

    def summary(self) -> dict:
        self.pause()
        return self.report(self.total) | {"train_seconds": self.total["seconds"], "steps": self.total["steps"],
                                          "peak_memory_mb_per_rank": peak_memory_per_rank(self.device)}
