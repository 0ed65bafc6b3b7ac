"""The data is part of the experiment: a run's fingerprint holds its data's identity (runner/data/identity.py),
so other data gets a new run directory, is refused under an explicit run.name, and is never resumed onto;
and a run that selects its best checkpoint on test says so.

Runs go through runner.train.main in this process (the train_main fixture): the behaviour under test does
not depend on being a separate process, and each call is seconds faster than a subprocess.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests import sample_files
from tests.util import QUIET, ok



def folder_args(root: Path, *extra) -> list[str]:
    """The folder preset on a tiny image folder: a linear model, one short epoch."""
    return ["--config", "folder", f"data.root={root}", "model.name=linear", "model.kwargs={}", "train.epochs=1",
            "train.global_batch_size=4", *QUIET, *extra]



def refused(result) -> str:
    """The one `error:` line of an exit-2 refusal."""
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-3000:]
    return lines[0]


def snapshot(root: Path) -> dict:
    """Every path under root with its bytes and mtime."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            found[str(p.relative_to(root))] = (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
    return found


def pets(tmp_path: Path, name: str = "pets", seed: int = 0) -> Path:
    return sample_files.write_folder(tmp_path / name, n_train=4, n_test=2, seed=seed)


# ---------------------------------------------------------------------------------------------- folders

def test_a_folder_given_a_new_class_is_a_new_run_directory_unless_named(tmp_path, train_main):
    """Adding a class folder changes the experiment: without run.name a new directory `folder-2` and one line
    saying what was added; with the explicit run.name it is refused in one line; the old run is untouched."""
    root = pets(tmp_path)
    runs = tmp_path / "runs"
    ok(train_main(folder_args(root)))
    before = snapshot(runs / "folder")
    sample_files.add_folder_images(root, "bird", n_train=6, n_test=2)
    again = ok(train_main(folder_args(root)))
    assert "already finished" not in again.stdout, "a run on other data is not the finished run"
    assert (runs / "folder-2" / "summary.json").is_file(), again.stdout[-3000:]
    assert "bird" in json.loads((runs / "folder-2" / "data.json").read_text())["class_names"]
    notes = [line for line in again.stdout.splitlines() if "bird" in line and "added" in line]
    assert len(notes) == 1 and "8 images added, class bird added" in notes[0], again.stdout
    assert snapshot(runs / "folder") == before
    line = refused(train_main(folder_args(root, "run.name=folder")))
    assert "class bird added" in line, line
    assert snapshot(runs / "folder") == before, "a refused run must not change the run directory"


@pytest.mark.slow
def test_a_folder_with_images_added_is_a_new_run_directory_even_with_more_epochs(tmp_path, train_main):
    """More images in an existing class, and more epochs: the finished run is not continued on the new data
    (its labels could have shifted); a new directory with a line saying how many images were added."""
    root = pets(tmp_path)
    runs = tmp_path / "runs"
    ok(train_main(folder_args(root)))
    before = snapshot(runs / "folder")
    sample_files.add_folder_images(root, "cat", n_train=3)
    again = ok(train_main(folder_args(root, "train.epochs=2")))
    assert "resumed from" not in again.stdout and "already finished" not in again.stdout, again.stdout[-3000:]
    assert (runs / "folder-2" / "summary.json").is_file()
    assert any("data: 3 images added" in line for line in again.stdout.splitlines()), again.stdout[-3000:]
    assert snapshot(runs / "folder") == before


def test_data_root_pointed_at_another_folder_is_refused_and_never_resumed_onto(tmp_path, train_main):
    """Another folder with other images is another experiment: refused in one line for the same run.name
    (also with more epochs, which would continue the checkpoint), and resume=<its checkpoint> is refused."""
    first, other = pets(tmp_path, "a", seed=0), pets(tmp_path, "b", seed=1)
    ok(train_main(folder_args(first, "run.name=pets")))
    run_dir = tmp_path / "runs" / "pets"
    before = snapshot(run_dir)
    line = refused(train_main(folder_args(other, "run.name=pets", "train.epochs=2")))
    assert "data: images replaced or touched" in line, line
    line = refused(train_main(folder_args(other, "run.name=other", f"resume={run_dir / 'checkpoints' / 'last'}")))
    assert "different config" in line and "data:" in line, line
    assert snapshot(run_dir) == before
    assert not (tmp_path / "runs" / "other" / "checkpoints").exists()


@pytest.mark.slow
def test_two_processes_agree_on_a_folder_and_its_change(tmp_path):
    """torchrun with 2 processes: each lists the folder for the identity; the same folder again is the
    finished run, a folder with a class added is `folder-2` with one line (from the main rank only)."""
    from tests.util import run_train, torchrun

    root = pets(tmp_path)
    runs = tmp_path / "runs"

    def launch():
        return run_train(folder_args(root, "data.val_fraction=0.25"), tmp_path, launcher=torchrun(2), timeout=600)

    ok(launch())
    assert "already finished" in ok(launch()).stdout
    sample_files.add_folder_images(root, "bird", n_train=6, n_test=2)
    again = ok(launch())
    assert (runs / "folder-2" / "summary.json").is_file(), again.stdout[-3000:]
    notes = [line for line in again.stdout.splitlines() if "8 images added, class bird added" in line]
    assert len(notes) == 1, again.stdout[-3000:]


# ---------------------------------------------------------------------------------------------- built-in datasets

def test_a_changed_mnist_file_is_a_new_run_directory_unless_named(tmp_path, train_main, mnist_root, copy_data):
    """MNIST files rewritten with other images (same sizes): a new directory `mnist-2` without run.name, one
    line naming the changed file under the explicit run.name; the finished run is untouched. Unchanged files
    are the same experiment: the finished run has nothing to do."""
    root = copy_data(mnist_root)
    args = ["--config", "mnist", f"data.root={root}", "train.epochs=1", *QUIET]
    runs = tmp_path / "runs"
    ok(train_main(args))
    assert "already finished" in ok(train_main(args)).stdout
    before = snapshot(runs / "mnist")
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    size = images.stat().st_size
    sample_files.write_mnist(tmp_path / "fresh", seed=5)
    shutil.copyfile(tmp_path / "fresh" / "MNIST" / "raw" / "train-images-idx3-ubyte", images)
    assert images.stat().st_size == size  # the same size, other content
    again = ok(train_main(args))
    assert "already finished" not in again.stdout, again.stdout[-3000:]
    assert (runs / "mnist-2" / "summary.json").is_file(), again.stdout[-3000:]
    assert snapshot(runs / "mnist") == before
    line = refused(train_main(args + ["run.name=mnist"]))
    assert "data: MNIST/raw/train-images-idx3-ubyte changed" in line, line
    assert snapshot(runs / "mnist") == before


# ---------------------------------------------------------------------------------------------- selected on test

def test_selecting_on_test_is_said_in_the_header_and_the_summary(tmp_path, train_main):
    """data.val_fraction=0 (digits have no val/): the best checkpoint and early stopping use test. The run
    proceeds, its header has a line saying 'selected on test', and summary.json has "selected_on": "test"."""
    result = ok(train_main(["--config", "digits", *QUIET, "train.epochs=1", "train.limit_train_steps=4",
                            "data.val_fraction=0", "run.name=ontest"]))
    stored = json.loads((tmp_path / "runs" / "ontest" / "summary.json").read_text())
    assert stored["selected_on"] == "test"
    lines = [line for line in result.stdout.splitlines() if "selected on test" in line]
    assert len(lines) == 1 and "data.val_fraction=0" in lines[0], result.stdout[-3000:]


def test_selecting_on_val_is_recorded_and_not_warned(tmp_path, train_main):
    result = ok(train_main(["--config", "digits", *QUIET, "train.epochs=1", "train.limit_train_steps=4",
                            "data.val_fraction=0.1", "run.name=onval"]))
    assert json.loads((tmp_path / "runs" / "onval" / "summary.json").read_text())["selected_on"] == "val"
    assert "selected on test" not in result.stdout
