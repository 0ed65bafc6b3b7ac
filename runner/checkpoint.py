"""Checkpoints through Accelerate's save_state/load_state, made atomic and verifiable.

A checkpoint is written by all ranks into `checkpoints/.tmp-step_N`, then the main process adds a
manifest (every file's size and sha256) and renames the directory to `checkpoints/step_N`. A directory
without a manifest, or whose files do not match it, is never resumed from: kill -9 at any moment leaves at
worst a `.tmp-*` directory that the next save clears.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from runner.config import setting
from runner.errors import UserError

MANIFEST = "manifest.json"
NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError):
    pass


@dataclass
class CheckpointConfig:
    every_steps: int = setting(0, min=0)       # save every N optimizer steps (0: off)
    every_epochs: int = setting(1, min=0)      # save at the end of every N epochs (0: off)
    keep_last: int = setting(2, min=1)         # how many of the newest checkpoints to keep
    keep_best: bool = True                     # also keep the best one by eval.monitor


class RunState:
    """The runner's own progress, saved inside every checkpoint (register_for_checkpointing)."""

    def __init__(self):
        self.epoch = 0                # the epoch in progress
        self.step_in_epoch = 0        # optimizer steps already taken in that epoch
        self.global_step = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.best_checkpoint: str | None = None
        self.evals_since_best = 0     # early-stopping counter
        self.fingerprint: dict = {}   # training-relevant config keys
        self.early_stopped = False

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path) -> None:
    """Raise CheckpointError unless `path` is a complete checkpoint whose files match its manifest."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir() or not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path} is not a checkpoint written by this runner (no {MANIFEST})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt") from None
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if f.stat().st_size != entry["size"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {f.stat().st_size} bytes, "
                                  f"expected {entry['size']}")
        if sha256(f) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its checksum")


def read_manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


class Checkpointer:
    def __init__(self, accelerator, run_dir: Path, cfg: CheckpointConfig, log=print):
        self.accelerator, self.cfg, self.log = accelerator, cfg, log
        self.dir = run_dir / "checkpoints"

    def complete(self) -> list[Path]:
        """Checkpoint directories that were renamed into place, oldest first (not yet verified)."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if NAME.match(p.name) and (p / MANIFEST).is_file()]
        return sorted(found, key=lambda p: p.name)

    def save(self, state: RunState) -> Path:
        acc = self.accelerator
        name = f"step_{state.global_step:08d}"
        final, tmp = self.dir / name, self.dir / f".tmp-{name}"
        if final.exists():  # e.g. a preemption right after a periodic save: the state is the same
            return final
        try:
            if acc.is_main_process:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
            acc.wait_for_everyone()
            if acc.is_main_process:
                files = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)}
                         for p in sorted(tmp.iterdir()) if p.is_file()}
                manifest = {"global_step": state.global_step, "epoch": state.epoch,
                            "step_in_epoch": state.step_in_epoch, "world_size": acc.num_processes,
                            "fingerprint": state.fingerprint, "files": files}
                with open(tmp / MANIFEST, "w") as f:
                    json.dump(manifest, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, final)
                self.prune(state)
        except Exception as e:  # torch.save reports a full disk as RuntimeError, safetensors as its own type
            shutil.rmtree(tmp, ignore_errors=True)
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
            raise CheckpointError(f"cannot write checkpoint {final}: {reason}; earlier checkpoints are kept "
                                  f"(is the disk full or read-only?)") from None
        acc.wait_for_everyone()
        return final

    def prune(self, state: RunState) -> None:
        keep = {p.name for p in self.complete()[-self.cfg.keep_last:]}
        if self.cfg.keep_best and state.best_checkpoint:
            keep.add(state.best_checkpoint)
        for p in self.complete():
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def choose(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `auto` picks the newest complete one that verifies, falling
        back (and saying so) past corrupt ones; a path must verify; `none` starts fresh."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            verify(path)
            return path
        candidates = self.complete()
        for path in reversed(candidates):
            try:
                verify(path)
                return path
            except CheckpointError as e:
                self.log(f"warning: {e}; falling back to an older checkpoint")
        return None

    def load(self, path: Path) -> None:
        try:
            self.accelerator.load_state(str(path))
        except Exception as e:  # torch/safetensors raise many types for a bad file
            raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from None
