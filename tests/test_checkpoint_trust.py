"""A checkpoint is loaded only when every file a load reads is listed in its manifest and matches it: a
planted pickle never runs, a gap in the manifest is never trusted, and nothing half-written is kept."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import Background, machine
from tests.util import PYTHON, REPO, clean_env, free_port

DIGITS = ["--config", "digits", "log.trackers=[]", "log.plot=false"]
# Checkpoints at steps 2, 4 and 6; the tests tamper with the newest (6), so a fallback lands on 4.
TRAINED = DIGITS + ["train.epochs=1", "train.limit_train_steps=6", "checkpoint.every_steps=2",
                    "checkpoint.keep_last=10", "run.name=trust"]
CONTINUE = TRAINED + ["train.epochs=2"]  # a longer run: not the finished one, so it resumes
NEWEST, OLDER = "step_00000006", "step_00000004"


class PlantsAFile:
    """Unpickling this object opens (creates) `marker`: the proof that a checkpoint ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def trained(tmp_path, train_main) -> Path:
    result = train_main(TRAINED)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "runs" / "trust" / "checkpoints"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_manifest(checkpoint: Path, change) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    (checkpoint / "manifest.json").write_text(json.dumps(change(manifest)))


def list_in_manifest(checkpoint: Path, name: str) -> None:
    """Re-write the manifest so that `name` is listed with its true size and sha256."""
    def listed(manifest):
        manifest["files"][name] = {"size": (checkpoint / name).stat().st_size, "sha256": sha256(checkpoint / name)}
        return manifest
    edit_manifest(checkpoint, listed)


def fell_back_or_refused(result, named: str, explicit: bool) -> None:
    """An explicitly named checkpoint: exit 2, one line. resume=auto: one warning line naming the bad
    checkpoint, and the run resumed from the one before it."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    if explicit:
        assert result.returncode == 2, output[-3000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
        return
    if result.returncode == 2:  # a refusal is allowed too, in one line
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        return
    assert result.returncode == 0, output[-3000:]
    warnings = [line for line in output.splitlines() if NEWEST in line]
    assert len(warnings) == 1 and "warning" in warnings[0] and named in warnings[0], output[-3000:]
    assert "resumed from" in result.stdout and OLDER in result.stdout, result.stdout[-3000:]


# a. A planted pickle never runs.

@pytest.mark.parametrize("where", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin",
                                   "scheduler.bin"])
@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "named"])
def test_a_planted_pickle_never_runs(trained, tmp_path, train_main, where, explicit):
    marker = tmp_path / "unpickled-code-ran"
    newest = trained / NEWEST
    torch.save(PlantsAFile(marker), newest / where)
    list_in_manifest(newest, where)
    result = train_main(CONTINUE + ([f"resume={newest}"] if explicit else []))
    assert not marker.exists(), f"loading the checkpoint ran the code planted in {where}"
    fell_back_or_refused(result, NEWEST, explicit)


# b. and e. Gaps in the manifest: never trusted, one line.

def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


def empty_files_and_flipped_weights(checkpoint: Path) -> str:
    edit_manifest(checkpoint, lambda m: {**m, "files": {}})
    flip_bytes(checkpoint / "model.safetensors")
    return "manifest"


def manifest_is_a_list(checkpoint: Path) -> str:
    edit_manifest(checkpoint, lambda m: list(m))
    return "manifest.json"


def files_is_a_list(checkpoint: Path) -> str:
    edit_manifest(checkpoint, lambda m: {**m, "files": list(m["files"])})
    return "files"


def no_fingerprint(checkpoint: Path) -> str:
    edit_manifest(checkpoint, lambda m: {k: v for k, v in m.items() if k != "fingerprint"})
    return "fingerprint"


def garbage_rng_state(checkpoint: Path) -> str:
    (checkpoint / "random_states_0.pkl").write_bytes(b"not a pickle at all" * 10)
    list_in_manifest(checkpoint, "random_states_0.pkl")
    return "random_states_0.pkl"


@pytest.mark.parametrize("damage", [empty_files_and_flipped_weights, manifest_is_a_list, files_is_a_list,
                                    no_fingerprint, garbage_rng_state])
@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "named"])
def test_a_gap_in_the_manifest_is_never_trusted(trained, train_main, damage, explicit):
    newest = trained / NEWEST
    named = damage(newest)
    result = train_main(CONTINUE + ([f"resume={newest}"] if explicit else []))
    fell_back_or_refused(result, named, explicit)


# c. Half-written checkpoints are cleared at the next start.

def test_stale_temporary_checkpoints_are_removed_at_the_next_start(trained, train_main):
    stale = [trained / ".tmp-step_00000007", trained / ".tmp-step_00000099"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    result = train_main(CONTINUE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(p.exists() for p in stale), sorted(p.name for p in trained.iterdir())


# d. fast_dev_run saves nothing, even when preempted.

def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has installed a handler for `signum` (so the signal will not kill it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (signum - 1) & 1)


@pytest.mark.slow
def test_preempted_fast_dev_run_saves_nothing(tmp_path):
    root = tmp_path / "runs"
    proc = subprocess.Popen([PYTHON, str(REPO / "runner/train.py"), *DIGITS, "train.fast_dev_run=3",
                             f"run.root={root}"], cwd=REPO, env=clean_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not catches(proc.pid, signal.SIGUSR1):
        assert proc.poll() is None and time.monotonic() < deadline, "the handler was never installed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)  # during start-up: kept, and acted on at the first steps
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, out[-3000:]
    assert "checkpoint saved" not in out and "nothing saved" in out, out[-3000:]
    assert not root.exists() or not any(root.iterdir()), sorted(p.name for p in root.rglob("*"))


# A rank lost while the other saves is a lost rank (exit 3), not a disk problem (exit 2).

@pytest.mark.slow
def test_a_rank_lost_during_a_save_is_a_lost_rank(tmp_path):
    port, run_dir = free_port(), tmp_path / "runs" / "saving"
    args = [str(REPO / "runner/train.py"), *DIGITS, "model.name=simple_cnn", "model.kwargs={width: 64, hidden: 512}",
            "train.epochs=100", "checkpoint.every_steps=1", "checkpoint.keep_last=1", "log.every_steps=1",
            "dist.timeout_s=30", "run.name=saving", f"run.root={tmp_path / 'runs'}"]
    nodes = [Background(machine(rank, 2, port) + args, tmp_path) for rank in range(2)]
    try:
        victim = nodes[1].worker(1, timeout=240)
        nodes[0].wait_for(lambda: any(" step 2/" in line for line in nodes[0].lines), 240, "training steps")
        nodes[0].wait_for(lambda: any((run_dir / "checkpoints").glob(".tmp-step_*")), 60, "a save in progress")
        victim.kill()
        rc = nodes[0].wait(90)
        assert rc is not None and rc != 0, nodes[0].tail()
        output = nodes[0].output
        print("\n".join(line for line in output.splitlines() if "error:" in line or "exitcode" in line))
        assert "another rank died" in output, output[-3000:]
        assert "cannot write checkpoint" not in output and "exitcode  : 2" not in output, output[-3000:]
        assert "exitcode  : 3" in output, output[-3000:]
    finally:
        for node in nodes:
            node.stop()
