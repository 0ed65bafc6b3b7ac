"""Run one config many times with different overrides: a Slurm job array, or one run after another here.

    python runner/sweep.py SWEEP.yaml [--config digits] [section.key=value ...]          # list the tasks
    sbatch --array=0-3 slurm/sweep.sbatch SWEEP.yaml [--config digits] [key=value ...]   # one run per task
    python runner/sweep.py SWEEP.yaml --local [--config digits] [key=value ...]          # here, in turn

A sweep file lists override sets, or a grid whose every combination is a task, or both (each set is
crossed with every grid point):

    name: lr-seed                      # optional: the prefix of every run name (default: the file's stem)
    config: digits                     # optional: --config for every task (the command line's wins)
    fixed: {train.epochs: 2}           # optional: overrides for every task
    grid: {optim.lr: [0.1, 0.05], train.seed: [0, 1]}
    runs:
      - {schedule.name: constant}
      - {schedule.name: cosine, schedule.warmup_steps: 20}

Every task's config is checked before anything starts. Each task is one runner/train.py run named from the
sweep and its overrides (`run.name=lr-seed-lr_0.1-seed_0`; `run.name=X` on the command line replaces the
prefix), so a preempted and requeued task, or the same sweep started again, resumes its own runs. The
tasks share `log.group=<sweep name>`: one MLflow experiment, or one W&B group.
Overrides on the command line apply to every task and may not set a swept key.

Flags:
  --config C   the config (preset or YAML file) the overrides apply to
  --local      run the tasks one after another in this shell; stops at a preempted one (exit 75)
  --task N     run task N only (slurm/sweep.sbatch passes SLURM_ARRAY_TASK_ID)
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repo's packages, not runner/*.py as top level
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import hashlib  # noqa: E402
import itertools  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import yaml  # noqa: E402

from runner.cli import Command  # noqa: E402
from runner.config import flatten, load  # noqa: E402
from runner.distributed import is_main_rank  # noqa: E402
from runner.errors import EXIT_PREEMPTED, UserError, shown  # noqa: E402
from runner.plan import Config  # noqa: E402
from runner.yaml_files import read_yaml  # noqa: E402

TRAIN = Path(__file__).resolve().parent / "train.py"
SBATCH = "slurm/sweep.sbatch"
SWEEP_KEYS = ("name", "config", "fixed", "grid", "runs")
NAME_LIMIT = 120  # characters of a run name, before it is shortened with a hash


@dataclass
class Task:
    index: int
    name: str
    overrides: dict  # dotted key -> value, this task's own


@dataclass
class Sweep:
    path: Path
    name: str
    config: str | None
    fixed: dict
    tasks: list[Task]


# ---------------------------------------------------------------------------------------------- reading

def override_text(value) -> str:
    """A value as `key=value` text that runner.config reads back as the same value."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def as_overrides(node, where: str) -> dict:
    """A mapping of overrides, nested or dotted, as {dotted.key: value}."""
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise UserError(f"{where} must be a mapping of section.key: value, not {type(node).__name__}")
    return flatten(node)


def read_grid(node, path: Path) -> list[dict]:
    grid = as_overrides(node, f"sweep file {path}: grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"sweep file {path}: grid.{key} must be a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combination)) for combination in itertools.product(*(grid[k] for k in keys))]


def read_runs(node, path: Path) -> list[dict]:
    if node is None:
        return []
    if not isinstance(node, list) or not node:
        raise UserError(f"sweep file {path}: runs must be a non-empty list of override sets")
    return [as_overrides(entry, f"sweep file {path}: runs[{i}]") for i, entry in enumerate(node)]


def read_sweep(path_text: str, name_override: str | None) -> Sweep:
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist")
    raw = read_yaml(path)
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise UserError(f"sweep file {path}: unknown key {unknown[0]}; a sweep file holds {', '.join(SWEEP_KEYS)}")
    if raw.get("grid") is None and raw.get("runs") is None:
        raise UserError(f"sweep file {path} has neither `grid` nor `runs`: nothing to sweep")
    runs = read_runs(raw.get("runs"), path) or [{}]
    points = read_grid(raw["grid"], path) if raw.get("grid") is not None else [{}]
    sets = [{**run, **point} for run in runs for point in points]
    for i, overrides in enumerate(sets):
        if "run.name" in overrides:
            raise UserError(f"sweep file {path}: task {i} sets run.name; the sweep names each run (set `name:`)")
    name = str(name_override or raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"sweep file {path}: name {name!r}: use letters, digits, '.', '_' and '-' only")
    config = raw.get("config")
    if config is not None and not isinstance(config, str):
        raise UserError(f"sweep file {path}: config must be a preset name or a file path")
    fixed = as_overrides(raw.get("fixed"), f"sweep file {path}: fixed")
    return Sweep(path, name, config, fixed, name_tasks(name, sets))


# ---------------------------------------------------------------------------------------------- naming

def labels(sets: list[dict]) -> dict:
    """The short label of each swept key: its last part, unless two swept keys share it."""
    keys = sorted({k for s in sets for k in s})
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(keys, leaves)}


def name_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_") or "x"


def with_digest(name: str, text: str) -> str:
    """`name-<8 hex digits of text>`, cut to NAME_LIMIT characters."""
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{name[:NAME_LIMIT - 9]}-{digest}"


def name_tasks(prefix: str, sets: list[dict]) -> list[Task]:
    short = labels(sets)
    names = []
    for overrides in sets:
        parts = [f"{name_part(short[k])}_{name_part(override_text(v))}" for k, v in overrides.items()]
        name = "-".join([prefix, *parts])
        names.append(with_digest(name, name) if len(name) > NAME_LIMIT else name)
    # Sets that differ only in characters a run name cannot hold ("a b", "a_b"): tell them apart by a digest
    # of their exact overrides (not by position, which could meet another task's name, or move when the file
    # is edited), so that each task keeps a run directory of its own.
    exact = ["\n".join(f"{k}={override_text(v)}" for k, v in sorted(o.items())) for o in sets]
    names = [name if names.count(name) == 1 else with_digest(name, text) for name, text in zip(names, exact)]
    first = {}
    for i, name in enumerate(names):
        if name in first:
            raise UserError(f"sweep tasks {first[name]} and {i} would share the run directory {name} (their "
                            f"overrides are the same: {shown(exact[i]) if exact[i] else 'none'}); list each set once")
        first[name] = i
    return [Task(i, name, overrides) for i, (name, overrides) in enumerate(zip(names, sets))]


# ---------------------------------------------------------------------------------------------- tasks

def train_args(sweep: Sweep, task: Task, config: str | None, cli_overrides: list) -> list[str]:
    """runner/train.py's arguments for one task: fixed, then the command line's, then the task's own."""
    args = ["--config", config] if config else []
    args.append(f"log.group={sweep.name}")  # the sweep's runs share an MLflow experiment / W&B group
    args += [f"{k}={override_text(v)}" for k, v in sweep.fixed.items()]
    args += [f"{k}={text}" for k, text in cli_overrides]
    args += [f"{k}={override_text(v)}" for k, v in task.overrides.items()]
    return args + [f"run.name={task.name}"]


def check_configs(sweep: Sweep, config: str | None, cli_overrides: list) -> None:
    """Build every task's config as runner/train.py will, so that a typo stops the sweep before any run."""
    for task in sweep.tasks:
        overrides = [tuple(a.split("=", 1)) for a in train_args(sweep, task, None, cli_overrides)]
        try:
            load(Config, config or "digits", overrides)
        except UserError as e:
            raise UserError(f"sweep {sweep.path}, task {task.index} ({task.name}): {e}") from None


def check_cli_overrides(sweep: Sweep, cli_overrides: list) -> None:
    swept = {k for t in sweep.tasks for k in t.overrides}
    for key, text in cli_overrides:
        if key in swept:
            raise UserError(f"{key}={text} on the command line would override a swept key of {sweep.path}; "
                            f"change the sweep file instead")


def task_from(text: str, sweep: Sweep) -> Task:
    if not re.fullmatch(r"\d+", text or ""):
        raise UserError(f"--task {text!r}: expected a task number (SLURM_ARRAY_TASK_ID)")
    index = int(text)
    if index >= len(sweep.tasks):
        raise UserError(f"--task {index} is out of range: sweep {sweep.path} has {len(sweep.tasks)} tasks "
                        f"(0-{len(sweep.tasks) - 1}); submit with --array=0-{len(sweep.tasks) - 1}")
    return sweep.tasks[index]


def print_plan(sweep: Sweep, config: str | None, argv_tail: list[str]) -> None:
    count = len(sweep.tasks)
    print(f"{count} tasks in sweep {sweep.name} ({sweep.path}), config {config or 'digits'}")
    width = max(len(t.name) for t in sweep.tasks)
    for task in sweep.tasks:
        shown = " ".join(f"{k}={override_text(v)}" for k, v in task.overrides.items())
        print(f"  task {task.index:<3} {task.name:<{width}}  {shown}")
    tail = shlex.join([str(sweep.path), *argv_tail])
    print(f"\nas a Slurm job array, one run per task:\n  sbatch --array=0-{count - 1} {SBATCH} {tail}")
    print(f"one after another, here:\n  python runner/sweep.py {tail} --local")


def run_local(sweep: Sweep, config: str | None, cli_overrides: list) -> int:
    results = []
    for task in sweep.tasks:
        print(f"[sweep {sweep.name}] task {task.index + 1}/{len(sweep.tasks)}: {task.name}", flush=True)
        code = subprocess.run([sys.executable, str(TRAIN), *train_args(sweep, task, config, cli_overrides)]).returncode
        results.append((task, code))
        if code == EXIT_PREEMPTED or code < 0 or code >= 128:
            print(f"[sweep {sweep.name}] task {task.index} stopped (exit {code}); run the sweep again to resume",
                  flush=True)
            return EXIT_PREEMPTED if code == EXIT_PREEMPTED else 128 + abs(code) if code < 0 else code
    failed = [(t, c) for t, c in results if c]
    print(f"[sweep {sweep.name}] {len(results) - len(failed)} of {len(results)} tasks finished"
          + "".join(f"; task {t.index} ({t.name}) exited {c}" for t, c in failed), flush=True)
    return failed[0][1] if failed else 0


def run(options: dict, overrides: list) -> int:
    args = options["args"]
    if len(args) != 1:
        raise UserError("give exactly one sweep file: python runner/sweep.py SWEEP.yaml [--config C] [key=value ...]")
    names = [text for key, text in overrides if key == "run.name"]
    cli_overrides = [(k, t) for k, t in overrides if k != "run.name"]
    sweep = read_sweep(args[0], names[-1] if names else None)
    config = options.get("--config") or sweep.config
    check_cli_overrides(sweep, cli_overrides)
    if "--task" in options:
        task = task_from(options["--task"], sweep)
        argv = [sys.executable, str(TRAIN), *train_args(sweep, task, config, cli_overrides)]
        if is_main_rank():
            print(f"[sweep {sweep.name}] task {task.index}: {shlex.join(argv[1:])}", flush=True)
        os.execv(sys.executable, argv)  # the same process: Slurm's signals reach the run itself
    check_configs(sweep, config, cli_overrides)
    if options.get("--local"):
        return run_local(sweep, config, cli_overrides)
    tail = (["--config", config] if options.get("--config") else []) + [f"{k}={t}" for k, t in overrides]
    print_plan(sweep, config, tail)
    return 0


COMMAND = Command(__doc__, {"--config": "value", "--local": "switch", "--task": "value"}, run, positional=True)


def main(argv=None) -> int:
    return COMMAND.main(argv)


if __name__ == "__main__":
    sys.exit(main())
