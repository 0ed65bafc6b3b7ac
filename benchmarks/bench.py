"""Benchmark: the runner against a plain Accelerate loop and PyTorch Lightning, on 1 and 2 processes.

    python -m benchmarks.bench [--seconds 1] [--rounds 3] [--json PATH] [--only cnn|linear|timm]
                               [--frameworks runner,accelerate,lightning] [--folder] [--full]

Two workloads, on files written in the real formats to a temporary directory: SimpleCNN at batch 64 on
CIFAR-format files, and Linear 784->10 at batch 32 on MNIST-format files (batch sizes per process). Each
is trained, one thread per process, on 1 process and on 2 processes (torchrun, gloo) by:
- the runner end to end (runner/train.py, one command per workload; img/s from its metrics.jsonl windows
  after the warm-up, so start-up is left out);
- a plain Accelerate loop written by hand over tensors in memory (benchmarks/loops.py);
- Lightning's Trainer over a TensorDataset DataLoader (strategy ddp on 2 processes), if Lightning is
  installed (`pip install -e ".[bench]"`). It runs after the Accelerate loop in the same command, which
  saves a second set of imports per round; its start-up is therefore not measured.
Augmentation, schedules and weight decay are off, so all three do the same arithmetic.

Cases run interleaved in rounds (every case once per round), so a slow spell of a shared machine hits
all of them; each case reports min / median / max img/s over the rounds, and ratios come from the medians
of this one run. Start-up is the seconds from the command's start to the end of its first optimizer step.
--seconds sets the timed steady state of each case in each round. --folder adds the image-folder case
(benchmarks/folder_bench.py: cache build rate, training on the cached folder). --full adds it and the
deep-dive cases (compute bound, tutorial loop, speed options, torchvision data path; benchmarks/deep.py)
and the timm:resnet18 workload (32x32 CIFAR files; alone: --only timm).
"""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repo's packages
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.launch import CaseFailed, loops_case, runner_case  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from benchmarks.workloads import DEFAULT, WORKLOADS, Workload  # noqa: E402
from runner.cli import Command  # noqa: E402
from runner.errors import UserError  # noqa: E402

FRAMEWORKS = ("runner", "accelerate", "lightning")
PROCESS_COUNTS = (1, 2)
# Seconds a command costs besides its timed steps (imports, process group, data, warm-up, exit) on an
# otherwise idle 2-core machine; only for the expected total printed at the start.
LAUNCH_OVERHEAD_S = {("runner", 1): 6, ("runner", 2): 10, ("accelerate", 1): 5, ("accelerate", 2): 9,
                     ("lightning", 1): 9, ("lightning", 2): 14}


@dataclass
class Launch:
    """One command per round: the runner trains one workload per command; the reference loops share one
    command per process count and train every workload."""
    frameworks: list[str]
    processes: int
    workloads: list[Workload]

    def case(self, framework: str) -> str:
        return f"{framework} {self.processes}x1"

    @property
    def label(self) -> str:
        return self.case("+".join(self.frameworks))

    def expected_seconds(self, seconds: float) -> float:
        overhead = max(LAUNCH_OVERHEAD_S[f, self.processes] for f in self.frameworks)
        return overhead + seconds * len(self.workloads) * len(self.frameworks)


def plan(frameworks: list[str], workloads: list[Workload]) -> list[Launch]:
    loops = [f for f in frameworks if f != "runner"]
    launches = []
    for processes in PROCESS_COUNTS:
        if "runner" in frameworks:
            launches += [Launch(["runner"], processes, [w]) for w in workloads]
        if loops:
            launches.append(Launch(loops, processes, list(workloads)))
    return launches


class StepBudget:
    """Timed steps per (workload, case): sized from a guess in round 1 (assuming no speed-up from a second
    process), then from the img/s that case measured, to last about `seconds`."""

    def __init__(self, seconds: float):
        self.seconds, self.measured = seconds, {}

    def steps(self, workload: Workload, case: str, processes: int) -> int:
        img_per_s = self.measured.get((workload.name, case), workload.guess_img_per_s)
        return max(3 * workload.warmup_steps, round(self.seconds * img_per_s / (workload.batch * processes)))

    def update(self, workload_name: str, case: str, img_per_s: float):
        self.measured[workload_name, case] = img_per_s


def run_launch(launch: Launch, folders: dict, budget: StepBudget, workdir: Path, name: str) -> dict:
    """{case: {workload: result}} of one command."""
    if launch.frameworks == ["runner"]:
        (workload,) = launch.workloads
        case = launch.case("runner")
        return {case: runner_case(workload, folders[workload.name], launch.processes,
                                  budget.steps(workload, case, launch.processes), workdir, name)}
    jobs = {f: [(w, folders[w.name], budget.steps(w, launch.case(f), launch.processes)) for w in launch.workloads]
            for f in launch.frameworks}
    measured = loops_case(jobs, launch.processes, workdir, name)
    return {launch.case(f): measured[f] for f in launch.frameworks}


def print_result(prefix: str, result: dict) -> None:
    startup = result.get("startup_seconds")
    print(f"{prefix} {result['img_per_s']:>9,.0f} img/s over {result['steps']:>5} steps"
          + (f"   start-up {startup:5.2f} s" if startup is not None else ""), flush=True)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_rounds(launches: list[Launch], folders: dict, rounds: int, seconds: float, workdir: Path) -> dict:
    """Every launch once per round; returns {(workload, label): [per-round results]} and the failures."""
    budget, results, failures, commands = StepBudget(seconds), {}, [], []
    for round_index in range(1, rounds + 1):
        round_started = time.perf_counter()
        for launch in launches:
            started, cpu_before = time.perf_counter(), children_cpu_seconds()
            name = f"r{round_index}-{'-'.join(launch.frameworks)}-{launch.processes}-{launch.workloads[0].name}"
            try:
                measured = run_launch(launch, folders, budget, workdir, name)
            except CaseFailed as failure:
                failures.append(f"round {round_index} {launch.label}: {failure}")
                print(f"round {round_index}/{rounds}  {launch.label:<15} FAILED: {failure}", flush=True)
                continue
            wall, cpu = time.perf_counter() - started, children_cpu_seconds() - cpu_before
            commands.append({"round": round_index, "command": launch.label, "wall_seconds": wall,
                             "cpu_seconds": cpu, "workloads": [w.name for w in launch.workloads]})
            for case, per_workload in measured.items():
                for workload_name, result in per_workload.items():
                    budget.update(workload_name, case, result["img_per_s"])
                    results.setdefault((workload_name, case), []).append(result)
                    print_result(f"round {round_index}/{rounds}  {case:<15} {workload_name:<7}", result)
            print(f"round {round_index}/{rounds}  {launch.label}: command {wall:.1f} s, cpu {cpu:.1f} s",
                  flush=True)
        print(f"round {round_index}/{rounds} took {time.perf_counter() - round_started:.0f} s; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
    return {"results": results, "failures": failures, "commands": commands}


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "values": values}


def summarise(results: dict) -> dict:
    """Per case: min / median / max of img/s and of the start-up figures; ratios of medians."""
    cases = {}
    for (workload_name, label), runs in results.items():
        case = {"workload": workload_name, "case": label}
        for field in ("img_per_s", "startup_seconds", "startup_reported_seconds"):
            values = [r[field] for r in runs if r.get(field) is not None]
            if values:
                case[field] = spread(values)
        cases[f"{workload_name} {label}"] = case
    return {"cases": cases, "ratios": ratios(cases)}


def ratios(cases: dict) -> dict:
    def median(workload, label):
        case = cases.get(f"{workload} {label}")
        return case["img_per_s"]["median"] if case else None

    pairs = [(f"runner / {other} {p}x1", f"runner {p}x1", f"{other} {p}x1")
             for other in ("accelerate", "lightning") for p in PROCESS_COUNTS]
    pairs += [(f"{f} 2x1 / {f} 1x1", f"{f} 2x1", f"{f} 1x1") for f in FRAMEWORKS]
    out = {}
    for workload in WORKLOADS:
        for name, top, bottom in pairs:
            a, b = median(workload, top), median(workload, bottom)
            if a and b:
                out.setdefault(workload, {})[name] = a / b
    return out


def ratio_text(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def markdown(summary: dict, workloads: list[Workload]) -> str:
    """The README's tables: img/s median (min-max) per case and workload, ratios, start-up."""
    def cell(case_key, field, fmt):
        case = summary["cases"].get(case_key, {}).get(field)
        return "" if case is None else (f"{fmt(case['median'])} ({fmt(case['min'])}-{fmt(case['max'])})")

    labels = sorted({c["case"] for c in summary["cases"].values()},
                    key=lambda label: (FRAMEWORKS.index(label.split()[0]), label))
    head = " | ".join(w.title for w in workloads)
    lines = [f"| img/s, median (min-max) | {head} |", "|---" * (len(workloads) + 1) + "|"]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(
            cell(f"{w.name} {label}", "img_per_s", lambda v: f"{v:,.0f}") for w in workloads) + " |")
    names = list(dict.fromkeys(n for per in summary["ratios"].values() for n in per))
    for name in names:
        lines.append(f"| **{name}** | " + " | ".join(
            ratio_text(summary["ratios"].get(w.name, {}).get(name)) for w in workloads) + " |")
    lines += ["", f"| start-up: s from the command's start to its first step | {head} |",
              "|---" * (len(workloads) + 1) + "|"]
    for label in labels:
        for field, suffix in (("startup_seconds", ""), ("startup_reported_seconds", " (its summary.json)")):
            row = [cell(f"{w.name} {label}", field, lambda v: f"{v:.1f}") for w in workloads]
            if any(row):
                lines.append(f"| {label}{suffix} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def folder_case(workdir: Path) -> dict | None:
    """The image-folder case of benchmarks/folder_bench.py (cache build rate, training on the cached
    folder), where that file exists."""
    if importlib.util.find_spec("benchmarks.folder_bench") is None:
        return None
    from benchmarks import folder_bench

    (workdir / "folder").mkdir()
    try:
        report = folder_bench.folder_benchmark(workdir / "folder")
    except Exception as e:  # an optional case must not lose the main figures
        return {"error": f"{type(e).__name__}: {e}"}
    report["markdown"] = folder_bench.markdown(report)
    return report


def options_from(options: dict) -> dict:
    try:
        seconds, rounds = float(options.get("--seconds", 1.0)), int(options.get("--rounds", 3))
    except ValueError:
        raise UserError("--seconds takes a number and --rounds a whole number") from None
    frameworks = options.get("--frameworks", ",".join(FRAMEWORKS)).split(",")
    only = options.get("--only")
    if seconds <= 0 or rounds < 1 or not set(frameworks) <= set(FRAMEWORKS) or (only and only not in WORKLOADS):
        raise UserError(f"expected --seconds > 0, --rounds >= 1, --frameworks from {','.join(FRAMEWORKS)}, "
                        f"--only one of {', '.join(WORKLOADS)}")
    if "lightning" in frameworks and importlib.util.find_spec("lightning") is None:
        print("lightning is not installed (pip install -e \".[bench]\"): its cases are left out", flush=True)
        frameworks.remove("lightning")
    return {"seconds": seconds, "rounds": rounds, "frameworks": frameworks,
            "workloads": [WORKLOADS[only]] if only else [w for name, w in WORKLOADS.items()
                                                         if name in DEFAULT or options.get("--full")]}


def print_report(report: dict, workloads: list[Workload]) -> None:
    print(f"\n{report['machine']['text']}\n")
    print(markdown(report, workloads))
    for failure in report["failures"]:
        print(f"failed: {failure}")
    if report.get("folder"):
        print("\nimage folder (benchmarks/folder_bench.py):")
        print(report["folder"].get("markdown") or f"failed: {report['folder']['error']}")


def run(options: dict, overrides: list) -> int:
    if overrides:
        raise UserError(f"unexpected argument {overrides[0][0]}={overrides[0][1]}")
    settings = options_from(options)
    machine = describe()
    launches = plan(settings["frameworks"], settings["workloads"])
    expected = settings["rounds"] * sum(launch.expected_seconds(settings["seconds"]) for launch in launches)
    print(f"{machine['text']}; load average {os.getloadavg()[0]:.1f} (a busy machine slows every case)\n"
          f"{len(launches)} commands x {settings['rounds']} rounds, {settings['seconds']:g} s timed per case: "
          f"expected about {expected / 60:.1f} min", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        folders = {w.name: w.write_files(workdir / "data") for w in settings["workloads"]}
        measured = run_rounds(launches, folders, settings["rounds"], settings["seconds"], workdir)
        report = {"machine": machine, "settings": {k: v for k, v in settings.items() if k != "workloads"}
                  | {"workloads": [w.name for w in settings["workloads"]]},
                  **summarise(measured["results"]), "failures": measured["failures"],
                  "commands": measured["commands"]}
        if options.get("--folder") or options.get("--full"):
            report["folder"] = folder_case(workdir)
        if options.get("--full"):
            from benchmarks.deep import deep_dive

            deep = [w for w in settings["workloads"] if w.name in DEFAULT]  # the deep dive studies these two
            report["deep"] = deep_dive(deep, folders, settings["seconds"], settings["rounds"], workdir)
    report["wall_seconds"] = time.perf_counter() - started
    report["load_average_at_end"] = os.getloadavg()[0]
    print_report(report, settings["workloads"])
    print(f"\ntotal {report['wall_seconds']:.0f} s")
    if options.get("--json"):
        path = Path(options["--json"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
        print(f"wrote {path}")
    return 1 if measured["failures"] else 0


COMMAND = Command(__doc__, {"--seconds": "value", "--rounds": "value", "--json": "value", "--only": "value",
                            "--frameworks": "value", "--folder": "switch", "--full": "switch"}, run)


def main(argv=None) -> int:
    return COMMAND.main(argv)


if __name__ == "__main__":
    sys.exit(main())
