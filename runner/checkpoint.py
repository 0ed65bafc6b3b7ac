"""Checkpoints through Accelerate's save_state/load_state, made atomic, verifiable and pickle-free for our state.

A checkpoint is written by all ranks into `checkpoints/.tmp-step_N`, then the main process adds
`run_state.json` and a manifest (every file's size and sha256) and renames the directory to
`checkpoints/step_N`. With train.ema_decay > 0 the main process also writes the weights' average,
`ema.safetensors` (every rank holds the same one), listed in the manifest like every file. A directory is
resumed from only if its manifest is well-formed, lists every file in the directory and every file a load
reads, and each file matches it. `checkpoints/last` and `checkpoints/best` are symlinks to the newest and
the best checkpoint. A checkpoint pruned by keep_last is renamed to a `.tmp-` name before it is removed, so
that a kill at any moment leaves each `step_N` whole.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from runner.config import setting
from runner.distributed import is_main_rank
from runner.ema import EMA_FILE, EmaWeights
from runner.errors import UserError, first_line, lost_another_rank
from runner.rundir import FingerprintError, RunDir, check_fingerprint
from runner.state import STATE_FILE, RunState, checkpoint_name, due

MANIFEST = "manifest.json"
NAME = re.compile(r"^step_(\d{8})$")
HANDLES = ("last", "best")
# What a load reads (Accelerate's names, and ours); the RNG files are per rank: random_states_<rank>.pkl.
REQUIRED_FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin", STATE_FILE, "random_states_0.pkl")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(UserError):
    pass


@dataclass
class CheckpointConfig:
    every_steps: int = setting(0, min=0)       # save every N optimizer steps (0: off)
    every_epochs: int = setting(1, min=0)      # save at the end of every N epochs (0: off)
    keep_last: int = setting(2, min=1)         # how many of the newest checkpoints to keep
    keep_best: bool = True                     # also keep the best one by eval.monitor


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path) -> dict:
    """The manifest, checked for shape: CheckpointError names what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({first_line(e)})") from None
    shape = {"global_step": int, "epoch": int, "step_in_epoch": int, "world_size": int, "fingerprint": dict,
             "files": dict}
    for key, kind in shape.items():
        if not isinstance(manifest, dict) or not isinstance(manifest.get(key), kind):
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} is malformed ({key} missing or not a "
                                  f"{kind.__name__})")
    for name, entry in manifest["files"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str) and SHA256.match(entry["sha256"])):
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} has a malformed entry for {name!r}")
    return manifest


def verify(path: Path) -> dict:
    """Raise CheckpointError unless `path` is a complete checkpoint whose files are exactly those its
    manifest lists, each matching; return the manifest."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir() or not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path} is not a checkpoint written by this runner (no {MANIFEST})")
    manifest = read_manifest(path)
    files = manifest["files"]
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    unlisted = sorted(present - set(files))
    if unlisted:
        raise CheckpointError(f"checkpoint {path} holds files its manifest does not list ({', '.join(unlisted)}); "
                              f"they would be loaded unchecked")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise CheckpointError(f"checkpoint {path}: its manifest does not list {', '.join(missing)}")
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if f.stat().st_size != entry["size"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {f.stat().st_size} bytes, "
                                  f"expected {entry['size']}")
        if sha256(f) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its checksum")
    return manifest


def find(path: str | Path) -> Path:
    """A checkpoint from what a user may name: a checkpoint directory, `checkpoints/best` or `last`, or a
    run directory (its best checkpoint, else its last). Verified."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        handles = [path / "checkpoints" / h for h in ("best", "last")]
        path = next((h for h in handles if h.exists()), handles[-1])
        if not path.exists():
            raise CheckpointError(f"run directory {path.parent.parent} holds no checkpoint")
    resolved = path.resolve() if path.is_symlink() else path
    verify(resolved)
    return resolved


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (runs/<name>/checkpoints/step_N)."""
    return checkpoint.parent.parent


def link(directory: Path, handle: str, target: str | None) -> None:
    """Point checkpoints/<handle> at `target` atomically (or remove it)."""
    path, tmp = directory / handle, directory / f".tmp-{handle}"
    if path.is_dir() and not path.is_symlink():  # a copy that followed the link (shutil.copytree, cp -rL)
        shutil.rmtree(path)
    if target is None or not (directory / target).is_dir():
        path.unlink(missing_ok=True)
        return
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, path)


class Checkpointer:
    """Saves, finds and loads the run's checkpoints, and says when one is due. A run that writes nothing
    has a disabled one: never due, nothing to resume, nothing saved."""

    def __init__(self, accelerator, run_dir: RunDir, cfg: CheckpointConfig, log, ema: EmaWeights):
        self.accelerator, self.cfg, self.log, self.ema = accelerator, cfg, log, ema
        self.run_dir, self.enabled, self.dir = run_dir, run_dir.enabled, run_dir.checkpoints

    def due(self, step: int, epoch: int, epoch_done: bool) -> bool:
        if not self.enabled:
            return False
        return due(self.cfg.every_steps, self.cfg.every_epochs, step, epoch, epoch_done)

    def complete(self) -> list[Path]:
        """Checkpoint directories that were renamed into place, oldest first (not yet verified)."""
        if not (self.enabled and self.dir.is_dir()):
            return []
        found = [p for p in self.dir.iterdir() if NAME.match(p.name) and not p.is_symlink()
                 and (p / MANIFEST).is_file()]
        return sorted(found, key=lambda p: p.name)

    def newest(self) -> str:
        """The newest complete checkpoint, as an error line names it ("none" before the first)."""
        return str((self.complete() or ["none"])[-1])

    def remove_stale_temporaries(self) -> None:
        """A save killed half-way leaves `.tmp-*`; nothing reads them. Main process, run dir locked."""
        if self.enabled and is_main_rank() and self.dir.is_dir():
            for p in self.dir.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()

    def save(self, state: RunState) -> Path | None:
        if not self.enabled:
            return None
        acc = self.accelerator
        name = checkpoint_name(state.global_step)
        final, tmp = self.dir / name, self.dir / f".tmp-{name}"
        if final.exists():  # e.g. a preemption right after a periodic save: the state is the same
            return final
        try:
            if is_main_rank():
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
            if is_main_rank():  # every rank holds the same average
                self.ema.save(tmp / EMA_FILE)
            acc.wait_for_everyone()
            if is_main_rank():
                self.seal(tmp, final, state)
        except Exception as e:  # torch.save reports a full disk as RuntimeError, safetensors as its own type
            if lost_another_rank(e):
                raise  # a lost rank (exit 3), not a disk problem
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint {final}: {getattr(e, 'strerror', None) or first_line(e)}"
                                  f"; earlier checkpoints are kept (is the disk full or read-only?)") from None
        acc.wait_for_everyone()
        return final

    def seal(self, tmp: Path, final: Path, state: RunState) -> None:
        """Main process: add the run state and the manifest, rename into place, move the handles, prune."""
        state.write(tmp)
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"global_step": state.global_step, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
                    "world_size": self.accelerator.num_processes, "fingerprint": state.fingerprint, "files": files}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        self.prune(state)
        link(self.dir, "last", final.name)
        link(self.dir, "best", state.best_checkpoint)

    def prune(self, state: RunState) -> None:
        keep = {p.name for p in self.complete()[-self.cfg.keep_last:]}
        if self.cfg.keep_best and state.best_checkpoint:
            keep.add(state.best_checkpoint)
        for p in self.complete():
            if p.name not in keep:
                # Renamed first: a kill -9 during the removal leaves a temporary, never a step_N missing files.
                doomed = p.with_name(f".tmp-removed-{p.name}")
                os.rename(p, doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    def resume(self, resume: str) -> tuple[Path, RunState] | None:
        """Load the checkpoint to resume from, if any: `auto` takes the newest one that verifies and loads,
        falling back (and saying so) past bad ones; a path or handle must verify and load; `none` starts
        fresh. A checkpoint of another experiment (fingerprint) is refused, never skipped."""
        if resume == "none" or not self.enabled:
            return None
        if resume != "auto":
            path = find(resume)
            check_fingerprint(read_manifest(path)["fingerprint"], self.run_dir.experiment, self.run_dir.defaults, path)
            return path, self.load(path)
        for path in reversed(self.complete()):
            try:
                check_fingerprint(verify(path)["fingerprint"], self.run_dir.experiment, self.run_dir.defaults, path)
                return path, self.load(path)
            except FingerprintError:
                raise
            except CheckpointError as e:
                self.log(f"warning: {e}; falling back to the checkpoint before it")
        return None

    def branch_from(self, chosen: Path) -> None:
        """Main process: checkpoints of this run newer than the one resumed from belong to another
        trajectory. Move them aside (kept, never resumed) so that a later resume=auto cannot pick them."""
        if not is_main_rank() or chosen.resolve().parent != self.dir.resolve():
            return
        later = [p for p in self.dir.iterdir() if NAME.match(p.name) and p.name > chosen.name]
        if not later:
            return
        aside = self.dir / f"branched-{time.strftime('%Y%m%d-%H%M%S')}-from-{chosen.name}"
        aside.mkdir()
        for p in later:
            os.rename(p, aside / p.name)
        for handle in HANDLES:
            if (self.dir / handle).is_symlink() and not (self.dir / handle).exists():
                link(self.dir, handle, chosen.name)
        self.log(f"resuming from an older checkpoint: moved {len(later)} later checkpoint(s) to {aside}")

    def load(self, path: Path) -> RunState:
        """Load a verified checkpoint into the prepared objects; return the run state stored with it."""
        try:
            state = RunState.read(path)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load checkpoint {path}: {first_line(e)}") from None
        self.check_rng_state(path)
        try:
            self.accelerator.load_state(str(path))
        except Exception as e:  # torch/safetensors raise many types for a bad file
            raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {first_line(e)}") from None
        try:  # the average goes on from where it was, never restarted from the weights
            self.ema.load(path / EMA_FILE)
        except UserError as e:
            raise CheckpointError(str(e)) from None
        return state

    def check_rng_state(self, path: Path) -> None:
        """Accelerate ignores an RNG file it cannot read; a listed file that does not load is an error.
        (Another world size has other rank files: a rank without one keeps its seeded stream.)"""
        from accelerate.utils import load

        rng = path / f"random_states_{self.accelerator.process_index}.pkl"
        if not rng.exists():
            return
        try:
            load(rng)  # weights_only: tensors and numpy arrays, never code
        except Exception as e:
            raise CheckpointError(f"cannot load checkpoint {path}: {rng.name} is unreadable "
                                  f"({type(e).__name__}: {first_line(e)})") from None
