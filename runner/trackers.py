"""MLflow and W&B: one tracker run per training run, however many segments (requeues, preemptions, kill -9,
another world size) it takes.

Accelerate's own trackers start a new tracker run at every process start (and its W&B tracker uses the run
name as the W&B project), so these two are driven here, by the main process only. The first segment
creates the tracker run, named after the run directory, and stores its id in `<run>/trackers.json`; every
later segment continues that run. Steps are the optimizer steps and timestamps the wall clock, so a resumed
run's curves continue where they stopped; the points re-logged after a kill -9 carry the same step and,
because resume is exact, the same value.

A tracker never kills training: one that cannot be reached at start is one line and exit 2 (or, with
`log.tracker_errors=warn`, a warning); one that goes away mid-run is one warning line, after which it is
left alone, and the run says at the end which steps it missed. metrics.jsonl holds every point either way.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from runner.errors import UserError, first_line

OWN_TRACKERS = ("mlflow", "wandb")
IDS_FILE = "trackers.json"  # in the run directory: {"mlflow": {...}, "wandb": {...}}

# MLflow retries a failed request 7 times with exponential backoff (minutes in all) and waits 120 s for an
# answer: a dead server would stall every log call. A tracker that does not answer promptly is given up
# instead (a user's own settings win).
MLFLOW_PROMPT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def read_ids(run_dir: Path) -> dict:
    try:
        ids = json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


class MLflowRun:
    name = "mlflow"
    settings = "log.tracking_uri or MLFLOW_TRACKING_URI"

    @staticmethod
    def connect(cfg):
        for key, value in MLFLOW_PROMPT.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        # One of the two is set: checked with the config.
        return MlflowClient(tracking_uri=cfg.tracking_uri or os.environ["MLFLOW_TRACKING_URI"])

    @classmethod
    def probe(cls, cfg) -> None:
        """Raises if the server does not answer."""
        cls.connect(cfg).search_experiments(max_results=1)

    def __init__(self, cfg, run_dir, params: dict, stored: dict):
        self.client = self.connect(cfg)
        self.uri = self.client.tracking_uri
        if stored.get("run_id"):
            self.run_id = stored["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")  # fails if the run is gone from this server
            return
        experiment = cfg.group or cfg.project
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def ids(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def log(self, scalars: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def finish(self, scalars: dict, files: list[Path]) -> None:
        step = scalars.pop("_step")
        if scalars:
            self.log(scalars, step)
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")

    def suspend(self) -> None:
        """Preempted: the run continues in a later segment."""
        self.client.set_terminated(self.run_id, "KILLED")

    def fail(self) -> None:
        """The run stopped on an error (exit 2 or 3): marked so, not left running."""
        self.client.set_terminated(self.run_id, "FAILED")


class WandbRun:
    name = "wandb"
    settings = "log.project, log.entity and your W&B login (or WANDB_MODE=offline)"

    @classmethod
    def probe(cls, cfg) -> None:
        """Nothing to ask before wandb.init: offline needs no server, and online, init is the check."""

    def __init__(self, cfg, run_dir, params: dict, stored: dict):
        import wandb

        resuming = bool(stored.get("id"))
        self.id = stored.get("id") or secrets.token_hex(6)  # W&B ids: lowercase letters and digits
        (run_dir.path / "tracking").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity or None, name=run_dir.name, id=self.id,
                              group=cfg.group or None, resume="allow", dir=str(run_dir.path / "tracking"),
                              config=None if resuming else params, reinit="create_new",
                              settings=wandb.Settings(init_timeout=60, console="off", silent=True))

    def ids(self) -> dict:
        return {"id": self.id}

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self, scalars: dict, files: list[Path]) -> None:
        scalars.pop("_step", None)
        self.run.summary.update(scalars)
        for path in files:
            self.run.save(str(path), base_path=str(path.parent), policy="now")
        self.run.finish()

    def suspend(self) -> None:
        self.run.finish(exit_code=75)

    def fail(self) -> None:
        self.run.finish(exit_code=1)


TRACKER_CLASSES = {"mlflow": MLflowRun, "wandb": WandbRun}


def check_installed(names: list[str]) -> list[str]:
    """The tracker packages named in log.trackers that are not installed (checked before anything starts)."""
    import importlib.util

    return [n for n in own(names) if importlib.util.find_spec(n) is None]


def unreachable(name: str, e: Exception) -> str:
    return f"{name} cannot be reached or refused the run: {type(e).__name__}: {first_line(e)}"


def refusal(name: str, e: Exception) -> str:
    return (f"{unreachable(name, e)}; check {TRACKER_CLASSES[name].settings}, or set log.tracker_errors=warn to "
            f"train without it")


def own(names: list[str]) -> list[str]:
    """The trackers of log.trackers driven here (the others through Accelerate)."""
    return [name for name in names if name in OWN_TRACKERS]


def probe(cfg) -> None:
    """Main process, before anything in the run directory changes (run.overwrite deletes): a tracker that does
    not answer is one line, exit 2, with the directory as it was (log.tracker_errors=warn: its start warns)."""
    if cfg.tracker_errors == "warn":
        return
    for name in own(cfg.trackers):
        try:
            TRACKER_CLASSES[name].probe(cfg)
        except Exception as e:  # noqa: BLE001  (whatever a tracker raises, the user gets one line)
            raise UserError(refusal(name, e)) from None


class Trackers:
    """The MLflow and W&B runs of this training run, on the main process. Each one that fails is given up
    with one warning line, and the steps it then misses are told at the end."""

    def __init__(self, cfg, warn):
        self.cfg, self.warn = cfg, warn
        self.active: list = []
        self.missed: dict[str, list[int]] = {}  # the steps each failed tracker did not get

    def start(self, run_dir, params: dict) -> None:
        ids = read_ids(run_dir.path)
        for name in own(self.cfg.trackers):
            try:
                tracker = TRACKER_CLASSES[name](self.cfg, run_dir, params, ids.get(name) or {})
            except Exception as e:  # noqa: BLE001  (whatever a tracker raises, the user gets one line)
                if self.cfg.tracker_errors != "warn":
                    raise UserError(refusal(name, e)) from None
                self.give_up(name, f"{unreachable(name, e)}; training goes on without it (log.tracker_errors=warn)")
                continue
            ids[name] = tracker.ids()
            self.active.append(tracker)
        if self.active:
            run_dir.write(IDS_FILE, json.dumps(ids, indent=1))

    def give_up(self, name: str, reason: str) -> None:
        self.warn(f"warning: {reason}")
        self.missed.setdefault(name, [])

    def call(self, tracker, method: str, *args) -> bool:
        try:
            getattr(tracker, method)(*args)
            return True
        except Exception as e:  # noqa: BLE001
            self.active.remove(tracker)
            self.give_up(tracker.name, f"{tracker.name} stopped answering ({type(e).__name__}: {first_line(e)}); "
                                       f"training goes on, metrics.jsonl keeps every point")
            return False

    def log(self, scalars: dict, step: int) -> None:
        for tracker in list(self.active):
            self.call(tracker, "log", scalars, step)
        for name in self.missed:
            if not self.missed[name] or self.missed[name][-1] != step:
                self.missed[name].append(step)

    def finish(self, scalars: dict, files: list[Path]) -> None:
        for tracker in list(self.active):
            self.call(tracker, "finish", dict(scalars), files)
        self.active = []

    def suspend(self) -> None:
        for tracker in list(self.active):
            self.call(tracker, "suspend")
        self.active = []

    def fail(self) -> None:
        for tracker in list(self.active):
            self.call(tracker, "fail")
        self.active = []

    def report(self) -> str | None:
        """What each tracker that failed missed, for the end of the run."""
        # A tracker that failed is given up: it missed every point from its failure on.
        lines = [f"{name} missed steps {steps[0]}-{steps[-1]} ({len(steps)} points; metrics.jsonl has them)"
                 if steps else f"{name} missed no metric point (it failed at the end: see the warning above)"
                 for name, steps in self.missed.items()]
        return "\n".join(lines) or None
