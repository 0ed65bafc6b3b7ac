"""What every stage of a run shares, decided once at start: the config as given, the plan, the process
group, the run directory and the log."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the types only: importing accelerate and torch here would slow down --help
    from accelerate import Accelerator

    from runner.plan import Config, Plan
    from runner.rundir import RunDir
    from runner.tracking import RunLog


@dataclass(frozen=True)
class RunContext:
    cfg: Config
    plan: Plan
    acc: Accelerator
    run_dir: RunDir
    log: RunLog
