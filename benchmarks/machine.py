"""What the figures were measured on: CPU model and the flags that decide bf16 speed, cores, versions."""
from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path


def cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux
        pass
    return model or platform.processor() or platform.machine(), flags


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    model, flags = cpu_model_and_flags()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": model, "cores": cores, "amx": bool({"amx_bf16", "amx_tile"} & flags),
            "avx512_bf16": "avx512_bf16" in flags, "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()[0],
            **{name: version(name) for name in ("torch", "accelerate", "lightning")}}
    info["text"] = (f"{model}, {cores} cores, AMX {'yes' if info['amx'] else 'no'}, "
                    f"avx512_bf16 {'yes' if info['avx512_bf16'] else 'no'}, torch {info['torch']}, "
                    f"accelerate {info['accelerate']}"
                    + (f", lightning {info['lightning']}" if info["lightning"] else ""))
    return info
