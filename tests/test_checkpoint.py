"""Checkpoints (runner/checkpoint.py, runner/state.py): atomic saves with a manifest, verification before
any load, exact resume from any step, the fallback past a bad newest checkpoint, and what a full or
read-only disk does to a save. A checkpoint is loaded only when every file a load reads is listed in its
manifest and matches it: a planted pickle never runs, a gap in the manifest is never trusted, and nothing
half-written is kept.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from runner.checkpoint import MANIFEST, REQUIRED_FILES, CheckpointError, verify
from runner.state import STATE_FILE, RunState

from tests.util import COMMON, DIGITS, DISK_ARGS, SHORT_EPOCH, assert_identical, final_weights, ok, run_train


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


def refused_if_named_else_fell_back(result, named: str, explicit: bool) -> None:
    """An explicitly named checkpoint: exit 2, one line. resume=auto: never a refusal; one warning line
    naming the bad checkpoint, and the run resumed from the one before it and finished."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    if explicit:
        assert result.returncode == 2, output[-3000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
        return
    assert result.returncode == 0, output[-3000:]
    warnings = [line for line in output.splitlines() if NEWEST in line]
    assert len(warnings) == 1 and "warning" in warnings[0] and named in warnings[0], output[-3000:]
    assert "resumed from" in result.stdout and OLDER in result.stdout, result.stdout[-3000:]


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


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def fill(mount: Path, leave_bytes: int) -> None:
    stat = os.statvfs(mount)
    free = stat.f_bavail * stat.f_frsize
    with open(mount / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


def test_resume_from_an_older_checkpoint_moves_later_ones_aside(tmp_path, train_main):
    args = DIGITS + SHORT_EPOCH + ["run.name=branchy", "checkpoint.every_steps=2", "checkpoint.keep_last=100"]
    ok(train_main(args))
    ckpts = tmp_path / "runs" / "branchy" / "checkpoints"
    old = ckpts / "step_00000004"
    branched = ok(train_main(args + [f"resume={old}", "train.max_steps=5"]))
    assert f"resumed from {old}" in branched.stdout
    aside = list(ckpts.glob("branched-*"))
    assert len(aside) == 1, sorted(p.name for p in ckpts.iterdir())
    assert sorted(p.name for p in aside[0].iterdir()) == ["step_00000006", "step_00000008"]
    assert all((p / "manifest.json").is_file() for p in aside[0].iterdir()), "moved checkpoints must be kept whole"
    assert (ckpts / "last").resolve() == (ckpts / "step_00000005").resolve()
    continued = ok(train_main(args))
    assert f"resumed from {ckpts / 'step_00000005'}" in continued.stdout, continued.stdout
    assert sorted(p.name for p in aside[0].iterdir()) == ["step_00000006", "step_00000008"]


def test_full_disk_when_saving_keeps_earlier_checkpoints(small_disk, tmp_path):
    first = run_train(DISK_ARGS + [f"run.root={small_disk}"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoints = small_disk / "disk" / "checkpoints"
    before = snapshot(checkpoints)
    assert before
    fill(small_disk, leave_bytes=8 * 1024)
    second = run_train(DISK_ARGS + [f"run.root={small_disk}", "train.epochs=2"], tmp_path)
    assert second.returncode == 2, second.stdout[-1000:] + second.stderr[-2000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in second.stderr
    assert snapshot(checkpoints) == before, "earlier checkpoints changed"
    assert not list(checkpoints.glob(".tmp-*")), "a partial checkpoint was left behind"
    (small_disk / "filler").unlink()
    third = run_train(DISK_ARGS + [f"run.root={small_disk}", "train.epochs=2"], tmp_path)
    assert third.returncode == 0 and "resumed from" in third.stdout


def test_read_only_run_directory_gives_one_line(small_disk, tmp_path):
    first = run_train(DISK_ARGS + [f"run.root={small_disk}"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = snapshot(small_disk / "disk")
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_disk)]).returncode == 0
    second = run_train(DISK_ARGS + [f"run.root={small_disk}", "train.epochs=2"], tmp_path)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Read-only file system" in lines[0], second.stderr[-2000:]
    assert snapshot(small_disk / "disk") == before


@pytest.mark.parametrize("step, where", [(6, "first step of epoch 2 (after the epoch-1 boundary)"),
                                         (5, "last step of epoch 1"), (9, "middle of epoch 2")])
def test_resume_from_any_step_is_bit_identical(reference, tmp_path, train_main, step, where):
    checkpoint = reference / "checkpoints" / f"step_{step:08d}"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["global_step"] == step
    result = ok(train_main(COMMON + ["run.name=resumed", f"resume={checkpoint}"]))
    assert f"resumed from {checkpoint}" in result.stdout
    assert_identical(final_weights(reference), final_weights(tmp_path / "runs" / "resumed"))


def test_corrupt_newest_checkpoint_falls_back_and_says_so(reference, tmp_path, train_main):
    run_dir = tmp_path / "runs" / "ref"
    shutil.copytree(reference, run_dir)
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:100])
    # A half-written checkpoint from a kill -9: never picked.
    shutil.copytree(newest.parent / "step_00000011", newest.parent / ".tmp-step_00000013")
    result = ok(train_main(COMMON + ["run.name=ref", "train.epochs=3"]))
    assert f"{newest} is corrupt" in result.stdout + result.stderr
    assert "resumed from" in result.stdout and "step_00000011" in result.stdout


def test_explicit_bad_checkpoints_give_one_line(reference, tmp_path, train_main):
    broken = tmp_path / "broken"
    shutil.copytree(reference / "checkpoints" / "step_00000004", broken)
    (broken / "optimizer.bin").write_bytes(b"\0" * 10)
    cases = {str(tmp_path / "missing"): "does not exist", str(tmp_path): "not a checkpoint",
             str(broken): "corrupt"}
    for path, expected in cases.items():
        result = train_main(COMMON + ["run.name=x", f"resume={path}"])
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


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
    refused_if_named_else_fell_back(result, NEWEST, explicit)


@pytest.mark.parametrize("damage", [empty_files_and_flipped_weights, manifest_is_a_list, files_is_a_list,
                                    no_fingerprint, garbage_rng_state])
@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "named"])
def test_a_gap_in_the_manifest_is_never_trusted(trained, train_main, damage, explicit):
    newest = trained / NEWEST
    named = damage(newest)
    result = train_main(CONTINUE + ([f"resume={newest}"] if explicit else []))
    refused_if_named_else_fell_back(result, named, explicit)


def test_stale_temporary_checkpoints_are_removed_at_the_next_start(trained, train_main):
    stale = [trained / ".tmp-step_00000007", trained / ".tmp-step_00000099"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    result = train_main(CONTINUE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(p.exists() for p in stale), sorted(p.name for p in trained.iterdir())


def test_a_pruned_checkpoint_is_never_left_half_removed(tmp_path, monkeypatch):
    """keep_last prunes the oldest checkpoint; a kill in the middle of its removal (here: the removal stops
    after its first file) must leave every step_N whole, and the remains a temporary the next start removes."""
    from runner.checkpoint import CheckpointConfig, Checkpointer
    from runner.ema import EmaWeights
    from runner.rundir import RunDir

    run_dir = RunDir(tmp_path / "run", {}, {})
    for step in (2, 4, 6):
        write_checkpoint(run_dir.checkpoints / f"step_{step:08d}")
    checkpointer = Checkpointer(None, run_dir, CheckpointConfig(keep_last=2, keep_best=False), print,
                                EmaWeights(None, 0.0, None))

    def killed_half_way(path, ignore_errors=False):
        next(p for p in sorted(Path(path).iterdir()) if p.name == MANIFEST).unlink()
        raise SystemExit("killed")

    monkeypatch.setattr(shutil, "rmtree", killed_half_way)
    with pytest.raises(SystemExit):
        checkpointer.prune(RunState(global_step=6))
    monkeypatch.undo()
    left = sorted(p.name for p in run_dir.checkpoints.iterdir())
    assert left == [".tmp-removed-step_00000002", "step_00000004", "step_00000006"], left
    assert all(verify(run_dir.checkpoints / name) for name in left[1:])
    checkpointer.remove_stale_temporaries()
    assert sorted(p.name for p in run_dir.checkpoints.iterdir()) == ["step_00000004", "step_00000006"]


# Verification on its own: a checkpoint directory built here, file by file.

def write_checkpoint(path: Path, **extra_files: bytes) -> Path:
    """A checkpoint directory holding every file a load reads (and `extra_files`), with a manifest that
    lists each with its true size and sha256."""
    path.mkdir(parents=True)
    for i, name in enumerate(REQUIRED_FILES):
        (path / name).write_bytes(f"{name} {i}".encode() * (i + 1))
    for name, body in extra_files.items():
        (path / name).write_bytes(body)
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)} for p in sorted(path.iterdir())}
    manifest = {"global_step": 6, "epoch": 1, "step_in_epoch": 0, "world_size": 1,
                "fingerprint": {"optim.lr": 0.1}, "files": files}
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def refused(path: Path) -> str:
    with pytest.raises(CheckpointError) as error:
        verify(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_a_complete_checkpoint_verifies(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "step_00000006", **{"random_states_1.pkl": b"rank 1"})
    manifest = verify(checkpoint)
    assert manifest["global_step"] == 6 and set(manifest["files"]) == set(REQUIRED_FILES) | {"random_states_1.pkl"}


def test_what_is_not_a_checkpoint(tmp_path):
    assert "does not exist" in refused(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    assert "is not a checkpoint written by this runner (no manifest.json)" in refused(tmp_path / "plain")
    (tmp_path / "a_file").write_text("x")
    assert "is not a checkpoint" in refused(tmp_path / "a_file")


def test_an_unlisted_file_is_refused(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "step_00000006")
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(b"planted")
    message = refused(checkpoint)
    assert "holds files its manifest does not list (custom_checkpoint_0.pkl)" in message


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_a_file_every_load_reads_must_be_listed(tmp_path, name):
    checkpoint = write_checkpoint(tmp_path / "step_00000006")
    (checkpoint / name).unlink()
    edit_manifest(checkpoint, lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != name}})
    assert f"its manifest does not list {name}" in refused(checkpoint)


def test_a_listed_file_that_is_missing(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "step_00000006")
    (checkpoint / "optimizer.bin").unlink()
    assert "is incomplete: optimizer.bin is missing" in refused(checkpoint)


def test_a_file_of_the_wrong_size(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "step_00000006")
    size = (checkpoint / "model.safetensors").stat().st_size
    with open(checkpoint / "model.safetensors", "ab") as f:
        f.write(b"!")
    assert f"is corrupt: model.safetensors has {size + 1} bytes, expected {size}" in refused(checkpoint)


def test_a_file_of_the_right_size_with_other_bytes(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "step_00000006")
    flip_bytes(checkpoint / "scheduler.bin")
    assert "is corrupt: scheduler.bin does not match its checksum" in refused(checkpoint)


@pytest.mark.parametrize("change, says", [
    (lambda m: "not json {", "manifest.json is unreadable"),
    (lambda m: json.dumps(list(m)), "manifest.json is malformed (global_step missing or not a int)"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "fingerprint"}),
     "manifest.json is malformed (fingerprint missing or not a dict)"),
    (lambda m: json.dumps({**m, "global_step": "6"}), "manifest.json is malformed (global_step missing"),
    (lambda m: json.dumps({**m, "files": list(m["files"])}), "manifest.json is malformed (files missing"),
    (lambda m: json.dumps({**m, "files": {**m["files"], "optimizer.bin": {"size": 3, "sha256": "0" * 63}}}),
     "manifest.json has a malformed entry for 'optimizer.bin'"),
    (lambda m: json.dumps({**m, "files": {**m["files"], "optimizer.bin": {"size": "3", "sha256": "0" * 64}}}),
     "manifest.json has a malformed entry for 'optimizer.bin'"),
], ids=["not json", "a list", "no fingerprint", "a string step", "files a list", "short sha256", "string size"])
def test_a_malformed_manifest_is_refused(tmp_path, change, says):
    checkpoint = write_checkpoint(tmp_path / "step_00000006")
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    (checkpoint / MANIFEST).write_text(change(manifest))
    assert says in refused(checkpoint)


# The run state in every checkpoint: plain JSON, checked field by field.

def test_run_state_reads_back_what_it_wrote(tmp_path):
    state = RunState(epoch=2, step_in_epoch=3, global_step=15, best_metric=-0.25, best_step=12,
                     evals_since_best=1, train_seconds=4, wall_seconds=5.5, segments=2, fingerprint={"a": 1})
    state.write(tmp_path)
    assert RunState.read(tmp_path) == state
    assert RunState.read(tmp_path).best_checkpoint == "step_00000012"
    RunState().write(tmp_path)
    assert RunState.read(tmp_path) == RunState() and RunState().best_checkpoint is None


@pytest.mark.parametrize("text, says", [
    ("[1, 2]", "run_state.json must hold an object"),
    ('"state"', "run_state.json must hold an object"),
    ("{}", "run_state.json lacks epoch"),
])
def test_a_run_state_that_is_not_an_object_with_every_field(tmp_path, text, says):
    (tmp_path / STATE_FILE).write_text(text)
    with pytest.raises(ValueError, match=says):
        RunState.read(tmp_path)


def test_a_run_state_that_is_not_json(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(b"\x80\x04\x95 a pickle, say")
    with pytest.raises(ValueError):
        RunState.read(tmp_path)


@pytest.mark.parametrize("field, value, says", [
    ("global_step", "15", "global_step='15' has the wrong type"),
    ("epoch", True, "epoch=True has the wrong type"),
    ("epoch", 1.5, "epoch=1.5 has the wrong type"),
    ("early_stopped", 1, "early_stopped=1 has the wrong type"),
    ("best_step", 1.0, "best_step=1.0 has the wrong type"),
    ("best_metric", "0.5", "best_metric='0.5' has the wrong type"),
    ("train_seconds", None, "train_seconds=None has the wrong type"),
    ("fingerprint", [], "fingerprint=[] has the wrong type"),
    ("global_step", -1, "global_step=-1 is negative"),
    ("wall_seconds", -0.5, "wall_seconds=-0.5 is negative"),
])
def test_a_run_state_field_of_the_wrong_type_or_sign_is_refused(tmp_path, field, value, says):
    RunState(global_step=15, best_step=12, best_metric=0.5).write(tmp_path)
    raw = json.loads((tmp_path / STATE_FILE).read_text())
    (tmp_path / STATE_FILE).write_text(json.dumps({**raw, field: value}))
    with pytest.raises(ValueError) as error:
        RunState.read(tmp_path)
    assert str(error.value) == f"{STATE_FILE}: {says}"
