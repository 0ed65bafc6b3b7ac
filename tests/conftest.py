"""Shared fixtures: tiny datasets in the real on-disk formats, and ways to run the runner.

- `mnist_root`, `fashion_mnist_root`, `cifar_root`, `folder_root`: session-scoped, read-only `data.root`
  directories. A test that damages files must work on a copy: `copy_data(mnist_root)` gives one under its
  tmp_path; `images` is such a copy of `folder_root`.
- `cli(args, ...)`: `runner/train.py` as a real subprocess (tests/util.run_train), run.root under tmp_path.
- `train_main(args, ...)`: `runner.train.main(args)` in this process, with its exit code and captured
  stdout/stderr. About 7 s faster per call than a subprocess (no fresh torch/accelerate import), so use
  it wherever the behaviour under test does not depend on being a separate process (a terminal, env vars).
- `command(main, args)`: any command's `main()` (predict, prepare_data, ...) in this process.
- `reference`: one uninterrupted run of tests/util.COMMON with a checkpoint after every step, for the
  exact-resume tests; read-only, copy it to change it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import sample_files
from tests.util import COMMON, MainResult, ok, reset_accelerate, run_train


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """data.root holding MNIST/raw/ with 256 train and 100 test images (IDX files, uncompressed)."""
    root = tmp_path_factory.mktemp("mnist_data")
    sample_files.write_mnist(root)
    return root


@pytest.fixture(scope="session")
def fashion_mnist_root(tmp_path_factory) -> Path:
    """data.root holding FashionMNIST/raw/ (torchvision's folder name for fashion_mnist)."""
    root = tmp_path_factory.mktemp("fashion_mnist_data")
    sample_files.write_mnist(root, folder="FashionMNIST", seed=1)
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """data.root holding cifar-10-batches-py/ with 5 x 40 train and 60 test images (md5s not official)."""
    root = tmp_path_factory.mktemp("cifar_data")
    sample_files.write_cifar10(root)
    return root


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory) -> Path:
    """data.root holding train/ and test/ image folders of 3 classes (PNG and JPEG, mixed sizes, a stray
    text file), for data.name=folder."""
    return sample_files.write_folder(tmp_path_factory.mktemp("folder_data"))


@pytest.fixture
def copy_data(tmp_path):
    """copy_data(root) -> a private copy of a dataset root that a test may damage. A folder cache that
    another test built in the shared root is left behind: the copy starts without one."""
    def copy(root: Path) -> Path:
        dest = tmp_path / f"data_{Path(root).name}"
        shutil.copytree(root, dest, ignore=shutil.ignore_patterns(".cache"))
        return dest
    return copy


@pytest.fixture
def images(folder_root, copy_data) -> Path:
    """A private copy of `folder_root`: tests that damage or cache the image folder use it."""
    return copy_data(folder_root)


@pytest.fixture
def cli(tmp_path):
    """cli(args, env=None, timeout=300) -> CompletedProcess of `python runner/train.py args`."""
    def call(args: list[str], **kwargs):
        return run_train([str(a) for a in args], tmp_path, **kwargs)
    return call


@pytest.fixture
def train_main(tmp_path, capsys):
    """train_main(args, run_root=None) -> MainResult: runner.train.main in-process, run.root under tmp_path."""
    from runner.train import main

    def call(args: list[str], run_root: Path | None = None) -> MainResult:
        run_root = Path(run_root or tmp_path / "runs")
        argv = [str(a) for a in args]
        if not any(a.startswith("run.root=") for a in argv):
            argv.append(f"run.root={run_root}")
        capsys.readouterr()
        reset_accelerate()
        try:
            code = main(argv)
        finally:
            reset_accelerate()
        out = capsys.readouterr()
        return MainResult(code, out.out, out.err, run_root)

    return call


@pytest.fixture
def command(capsys):
    """command(main, args) -> (exit code, stdout, stderr) of a command's main() run in this process."""
    def call(main, args: list) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return call


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted run that keeps a checkpoint after every optimizer step."""
    tmp = tmp_path_factory.mktemp("reference")
    ok(run_train(COMMON + ["run.name=ref", "checkpoint.every_steps=1", "checkpoint.keep_last=100"], tmp))
    return tmp / "runs" / "ref"


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root and mount, as on CI); unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a small filesystem")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)
