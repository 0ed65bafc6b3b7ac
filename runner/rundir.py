"""The run directory `runs/<name>/`: its name, its lock, the resume policy, the config fingerprint and
the files a run writes there (config.yaml, data.json, metrics.jsonl, summary.json).

A run directory belongs to one experiment (one fingerprint). Without an explicit `run.name`, a changed
training config gets the next free name (`digits-2`, ...) rather than an error; with one, it is refused.
While a run writes to its directory it holds `run.lock`, so that a second launch cannot interleave with it.
A run that writes nothing (`train.fast_dev_run`) gets a disabled RunDir, which says so and writes nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from runner.config import fingerprint_keys, flatten
from runner.data.identity import KEY as DATA_IDENTITY
from runner.data.identity import describe_change
from runner.distributed import is_main_rank
from runner.errors import ConfigError, UserError
from runner.preemption import slurm_job_id
from runner.schedule import replanned_note
from runner.state import COMPLETED, FINISHED

LOCK = "run.lock"


class FingerprintError(UserError):
    pass


@dataclass
class RunConfig:
    name: str = ""           # default: the config's name (-2, -3, ... when its training keys changed), plus
                             # the Slurm job id under Slurm
    root: str = "runs"
    overwrite: bool = False  # with resume=none: delete the checkpoints already in the run directory
    requeue: bool = True     # under Slurm: requeue the job after a preemption checkpoint

    def validate(self):
        if len(self.name) > 200:
            raise ConfigError(f"run.name is {len(self.name)} characters long; use at most 200")
        if self.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(f"run.name={self.name!r}: use letters, digits, '.', '_' and '-' only")


def fingerprint(cfg, data_identity=None) -> dict:
    """The values of the keys declared `fingerprint=True` and the data's identity (runner/data/identity.py):
    what makes two runs the same experiment."""
    keys = set(fingerprint_keys(type(cfg)))
    return {**{k: v for k, v in flatten(dataclasses.asdict(cfg)).items() if k in keys}, DATA_IDENTITY: data_identity}


def default_fingerprint(cfg) -> dict:
    """The fingerprint of a default config. A key a run's stored config or manifest lacks was added to the
    runner after the run was written, and the run did what the key's default does (a new key's default keeps
    the old behaviour): completed with it, an older run stays the same experiment. The data identity has no
    default (None: not recorded)."""
    return fingerprint(type(cfg)())


def stored_fingerprint(run_dir: Path, current: dict, defaults: dict) -> dict | None:
    """The fingerprint a run directory was written with (None: no config there): from its config.yaml, and
    the data identity from its data.json; keys it lacks take their defaults."""
    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    flat = flatten(raw) if isinstance(raw, dict) else {}
    try:
        card = json.loads((run_dir / "data.json").read_text())
        flat[DATA_IDENTITY] = card.get("identity") if isinstance(card, dict) else None
    except (OSError, ValueError):
        pass
    return {k: flat.get(k, defaults.get(k)) for k in current}


def differences(saved: dict, current: dict) -> list[str]:
    """What changed from `saved` to `current`, one phrase per key ("data: 8 images added, class bird added")."""
    differing = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    return [f"data: {describe_change(saved.get(k), current.get(k))}" if k == DATA_IDENTITY
            else f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in differing]


def check_fingerprint(saved: dict, current: dict, defaults: dict, where: Path) -> None:
    differing = differences({**defaults, **saved}, current)
    if differing:
        raise FingerprintError(f"{where} was written with a different config ({'; '.join(differing[:8])}); use "
                               f"another run.name (or none, to get a fresh one), or resume=none run.overwrite=true "
                               f"to start over")


def resolve_run_dir(cfg: RunConfig, config_label: str, current: dict, defaults: dict) -> tuple[Path, str | None]:
    """(run directory, a line to print or None). An explicit run.name is used as is; the default name
    moves on to `<name>-2`, `-3`, ... past directories that hold another experiment."""
    root = Path(cfg.root)
    if root.exists() and not root.is_dir():
        raise UserError(f"run.root={cfg.root} is a file, not a directory")
    if cfg.name:
        return root / cfg.name, None
    job = slurm_job_id()
    base = f"{config_label}-{job}" if job else config_label  # stable across requeues and restarts
    first = stored_fingerprint(root / base, current, defaults)
    for n in range(1, 10_000):
        run_dir = root / (base if n == 1 else f"{base}-{n}")
        saved = first if n == 1 else stored_fingerprint(run_dir, current, defaults)
        if saved is None or saved == current:
            note = None if n == 1 else (f"{root / base} holds a run with other training keys "
                                        f"({'; '.join(differences(first, current)[:8])}); this run is "
                                        f"{run_dir.name} (set run.name to choose)")
            return run_dir, note
    raise UserError(f"{root} holds 10,000 runs named {base}-N; set run.name")


class RunDir:
    """Where a run writes, and whether it writes at all. The main process claims it (lock and resume policy)
    before anything is written there and releases it at the end; every write goes through it."""

    def __init__(self, path: Path | None, experiment: dict, defaults: dict, note: str | None = None):
        self.path, self.experiment, self.defaults, self.note = path, experiment, defaults, note
        self.enabled = path is not None
        self.lock = RunLock(path) if self.enabled else None

    @classmethod
    def resolve(cls, cfg, config_label: str, data_identity, writes: bool) -> "RunDir":
        """The run directory of the root config `cfg` (its experiment: the fingerprint with the data's identity)."""
        experiment, defaults = fingerprint(cfg, data_identity), default_fingerprint(cfg)
        if not writes:
            return cls(None, experiment, defaults)
        path, note = resolve_run_dir(cfg.run, config_label, experiment, defaults)
        return cls(path, experiment, defaults, note)

    def __str__(self) -> str:
        return str(self.path) if self.enabled else "(fast_dev_run: nothing is written)"

    @property
    def name(self) -> str:
        return self.path.name if self.enabled else "fast_dev_run"

    @property
    def metrics_file(self) -> Path | None:
        return self.path / "metrics.jsonl" if self.enabled else None

    @property
    def checkpoints(self) -> Path | None:
        return self.path / "checkpoints" if self.enabled else None

    def scratch(self, name: str) -> Path:
        """A folder for debugging output: in the run directory, or in the temp dir for a run that writes
        nothing."""
        return self.path / name if self.enabled else Path(tempfile.gettempdir()) / f"runner-{name}"

    def take(self, cfg) -> dict | None:
        """Main process, before anything is written: take the lock (a second launch on this directory stops
        here), then decide under it whether this run has already finished: its stored summary, or None. A
        launch that waited while the same run finished must see it finished, not resume from its end."""
        if not (self.enabled and is_main_rank()):
            return None
        self.lock.acquire()
        return self.finished_summary(cfg)

    def take_everywhere(self, cfg, acc, preflight) -> dict | None:
        """`take` on the main rank, then, for a run that will train and write, `preflight()` (checks that
        must pass before anything here changes); every rank learns the decision (finished, or refused), so
        that all stop or all go on."""
        from accelerate.utils import broadcast_object_list

        decision = [None]
        if is_main_rank():
            try:
                finished = self.take(cfg)
                if finished is None and self.enabled:
                    preflight()
                decision = [("finished", finished)]
            except UserError as e:
                decision = [("refused", str(e))]
        if acc.num_processes > 1:
            broadcast_object_list(decision)
        outcome, value = decision[0]
        if outcome == "refused":
            raise UserError(value)
        return value

    def finished_summary(self, cfg) -> dict | None:
        """The stored summary of a run that already finished as this same experiment and length (epochs,
        max_steps), or None. Running it again must change nothing. More epochs after a schedule that has
        ended re-plan it, which the run's header says (see replanned_note)."""
        if cfg.resume != "auto" or stored_fingerprint(self.path, self.experiment, self.defaults) != self.experiment:
            return None
        try:
            summary = json.loads((self.path / "summary.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(summary, dict) or summary.get("stopped") not in FINISHED:
            return None
        if summary.get("length") == {"epochs": cfg.train.epochs, "max_steps": cfg.train.max_steps}:
            return summary
        if summary.get("stopped") == COMPLETED:
            length = summary.get("length")
            self.note = replanned_note(cfg.schedule, self.path, length.get("epochs") if isinstance(length, dict)
                                       else None, cfg.train.epochs) or self.note
        return None

    def claim(self, resume: str, overwrite: bool, has_checkpoints: bool) -> None:
        """Main process, holding the lock (take): enforce the resume policy."""
        if not (self.enabled and is_main_rank()):
            return
        if resume == "none" and has_checkpoints:
            if not overwrite:
                raise UserError(f"{self.path} already holds checkpoints and resume=none; use resume=auto to "
                                f"continue it, run.overwrite=true to start over, or another run.name")
            shutil.rmtree(self.checkpoints)
            for stale in ("metrics.jsonl", "summary.json", "trackers.json"):  # a new tracker run too
                (self.path / stale).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, text: str) -> None:
        """Main process: replace `name` atomically (a kill -9 leaves the old file or the new, never half)."""
        if not (self.enabled and is_main_rank()):
            return
        tmp = self.path / f".{name}.tmp"
        try:
            tmp.write_text(text)
            tmp.replace(self.path / name)
        finally:
            tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temporary behind

    def release(self) -> None:
        if self.enabled:
            self.lock.release()


class RunLock:
    """`run.lock` in the run directory, taken by the main process of a launch: its content is written to a
    file of its own, then hard-linked into place (atomic, and it fails if a lock exists, on a shared
    filesystem too), so a lock is never empty or half-written. A lock whose holder is gone is taken over: a
    dead process on this host, or an earlier run of the same Slurm job (a requeue, possibly on another
    node)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.held = False
        self.created: list[Path] = []  # the folders acquire made (the run directory, and run.root if new)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": slurm_job_id(),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def holder_is_gone(self, holder: dict) -> bool:
        if holder.get("slurm_job") and holder.get("slurm_job") == self.me["slurm_job"]:
            return True
        if holder.get("host") != self.me["host"]:
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid == self.me["pid"]:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def holder(self) -> dict | None:
        """Who holds the lock; {} when it was released just now; None when it names nobody. The lock's
        content is linked into place whole, so an empty or unreadable lock was never a live run's (a crash
        of the machine, an older runner): it is stale."""
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}  # released just now: try again
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) and "pid" in holder and "host" in holder else None

    def place(self) -> bool:
        """Write the lock's content to a file of our own, then link it into place: the lock exists whole or
        not at all (a full disk fails before it exists). False if another lock is there."""
        tmp = self.path.with_name(f".{LOCK}.{self.me['host']}.{self.me['pid']}.tmp")
        try:
            tmp.write_text(json.dumps(self.me))
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def acquire(self) -> None:
        self.created = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.link_or_refuse()
        except BaseException:
            self.remove_created_dir()
            raise

    def link_or_refuse(self) -> None:
        for _ in range(3):
            if self.place():
                self.held = True
                return
            holder = self.holder()
            if holder and not self.holder_is_gone(holder):
                raise UserError(f"{self.path.parent} is in use by pid {holder.get('pid')} on host "
                                f"{holder.get('host')} (since {holder.get('since')}); wait for it, stop it, "
                                f"or use another run.name")
            if holder == {}:
                continue
            self.path.unlink(missing_ok=True)  # a dead holder's lock (or one that names nobody): take it over
        raise UserError(f"cannot take the lock {self.path}: another process keeps taking it")

    def remove_created_dir(self) -> None:
        """A run refused or failed before it wrote anything leaves nothing behind, run.root included."""
        for folder in self.created:  # innermost first
            if not folder.is_dir() or any(folder.iterdir()):
                return
            folder.rmdir()

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            self.remove_created_dir()
