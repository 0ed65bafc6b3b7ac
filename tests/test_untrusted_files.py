"""Nothing on disk can run code or fool the runner, and every bad file or value ends in one short line.

Config files and overrides: devices, FIFOs, directories, duplicate keys, aliases that expand without end,
nesting past any sane depth. Data files: crafted pickles, files that are not regular files, IDX headers that
declare nothing, a `processed/` folder planted beside the checked MNIST files.
"""
from __future__ import annotations

import builtins
import os
import pickle
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import QUIET
from tests.test_config import error_line, write
from tests.util import PYTHON, REPO, clean_env

CIFAR = "cifar-10-batches-py"


def files_under(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if not p.is_dir()] if Path(root).exists() else []


# ---------------------------------------------------------------------------------------------- crafted pickles

class RunsShell:
    """Unpickling this runs `touch marker` through os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class OpensFile(RunsShell):
    """Unpickling this creates `marker` through builtins.open."""

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.mark.parametrize("payload", [RunsShell, OpensFile])
@pytest.mark.parametrize("file", ["batches.meta", "data_batch_2", "test_batch"])
def test_a_crafted_cifar_pickle_never_runs(train_main, cifar_root, copy_data, tmp_path, file, payload):
    root = copy_data(cifar_root)
    path, marker = root / CIFAR / file, tmp_path / "code_ran"
    with open(path, "wb") as f:
        pickle.dump(payload(marker) if file == "batches.meta" else {"data": payload(marker), "labels": [1]}, f)
    result = train_main(["--config", "cifar10", f"data.root={root}", *QUIET])
    line = error_line(result)
    assert not marker.exists()
    assert str(path) in line and "refused" in line
    assert files_under(result.run_root) == []


def test_a_truncated_batches_meta(train_main, cifar_root, copy_data):
    root = copy_data(cifar_root)
    path = root / CIFAR / "batches.meta"
    path.write_bytes(path.read_bytes()[:40])
    line = error_line(train_main(["--config", "cifar10", f"data.root={root}", *QUIET]))
    assert str(path) in line and "truncated" in line


def test_batches_meta_that_does_not_name_ten_classes(train_main, cifar_root, copy_data):
    root = copy_data(cifar_root)
    path = root / CIFAR / "batches.meta"
    with open(path, "wb") as f:
        pickle.dump({"label_names": ["cat", "dog"]}, f)
    line = error_line(train_main(["--config", "cifar10", f"data.root={root}", *QUIET]))
    assert str(path) in line and "label_names" in line


def test_cifar_class_names_are_read_from_batches_meta(cifar_root, copy_data):
    from runner.data.datasets import load_cifar10

    root = copy_data(cifar_root)
    names = [f"class {chr(65 + i)}" for i in range(10)]
    with open(root / CIFAR / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": 40, "num_vis": 3072}, f)
    for train in (True, False):
        split, dataset = load_cifar10(root, download=False, train=train)
        assert split.class_names == names and split.subset(torch.arange(3)).class_names == names
        image, label = dataset[7]  # the DataLoader path sees the same samples, as CHW uint8 tensors
        assert torch.equal(image, split.images[7]) and label == int(split.labels[7])


def test_cifar_labels_that_are_not_integers(train_main, cifar_root, copy_data):
    root = copy_data(cifar_root)
    path = root / CIFAR / "test_batch"
    with open(path, "rb") as f:
        entry = pickle.load(f)  # the sample file the test wrote itself
    entry["labels"] = [str(label) for label in entry["labels"]]
    with open(path, "wb") as f:
        pickle.dump(entry, f)
    line = error_line(train_main(["--config", "cifar10", f"data.root={root}", *QUIET]))
    assert str(path) in line and "integers" in line


# ---------------------------------------------------------------------------------------------- not regular files

def make_unreadable(path: Path, kind: str) -> None:
    """Replace a data or config file by something that is not a readable regular file."""
    if path.exists():
        path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    elif kind == "endless device":
        path.symlink_to("/dev/zero")  # reading it would never end
    else:  # reading fails with EIO: an unreadable file that tests running as root can still make
        path.symlink_to("/proc/self/mem")


@pytest.mark.parametrize("kind, says", [("directory", "is a directory"), ("endless device", "character device"),
                                        ("io error", "cannot read")])
@pytest.mark.parametrize("dataset, file", [("mnist", "MNIST/raw/train-images-idx3-ubyte"),
                                           ("cifar10", f"{CIFAR}/data_batch_1")])
def test_a_data_file_that_cannot_be_read(train_main, request, copy_data, dataset, file, kind, says):
    if kind == "io error" and not Path("/proc/self/mem").exists():
        pytest.skip("needs Linux's /proc/self/mem")
    root = copy_data(request.getfixturevalue(f"{dataset.replace('10', '')}_root"))
    make_unreadable(root / file, kind)
    result = train_main(["--config", dataset, f"data.root={root}", *QUIET])
    line = error_line(result)
    assert str(root / file) in line and says in line and "cannot write" not in line
    assert files_under(result.run_root) == []


@pytest.mark.slow
def test_a_data_file_that_is_a_fifo(cli, mnist_root, copy_data):
    """Reading a FIFO blocks until a writer comes: the real script must refuse it at once."""
    root = copy_data(mnist_root)
    path = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    make_unreadable(path, "fifo")
    line = error_line(cli(["--config", "mnist", f"data.root={root}", *QUIET], timeout=120))
    assert str(path) in line and "named pipe" in line


@pytest.mark.parametrize("dataset, file, says", [("mnist", "MNIST/raw/t10k-images-idx3-ubyte", "truncated or padded"),
                                                 ("cifar10", f"{CIFAR}/test_batch", "at most")])
def test_a_huge_sparse_data_file_is_refused_before_reading(train_main, request, copy_data, dataset, file, says):
    """64 GB that take no disk: refused from its size, never read into memory."""
    root = copy_data(request.getfixturevalue(f"{dataset.replace('10', '')}_root"))
    with open(root / file, "r+b") as f:
        f.truncate(2 ** 36)
    line = error_line(train_main(["--config", dataset, f"data.root={root}", *QUIET]))
    assert str(root / file) in line and says in line and str(2 ** 36) in line.replace(",", "")


@pytest.mark.parametrize("dims", [(0, 28, 28), (256, 0, 0), (256, 28, 0)])
def test_an_idx_header_with_a_zero_dimension(train_main, mnist_root, copy_data, dims):
    root = copy_data(mnist_root)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes((0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims))
    line = error_line(train_main(["--config", "mnist", f"data.root={root}", *QUIET]))
    assert str(path) in line and str(list(dims)) in line


def test_a_planted_processed_folder_does_not_replace_the_checked_files(mnist_root, copy_data):
    """torchvision's MNIST prefers MNIST/processed/{training,test}.pt to the raw IDX files it was given."""
    from runner.data.splits import DataConfig, load_splits

    root = copy_data(mnist_root)
    processed = root / "MNIST" / "processed"
    processed.mkdir()
    for name, n in (("training.pt", 256), ("test.pt", 100)):
        torch.save((torch.full((n, 28, 28), 7, dtype=torch.uint8), torch.zeros(n, dtype=torch.long)), processed / name)
    splits = load_splits(DataConfig(name="mnist", root=str(root)), seed=0)
    raw = (root / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()
    expected = torch.from_numpy(np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28).copy())
    assert torch.equal(splits.train.images, expected)


# ---------------------------------------------------------------------------------------------- config files

@pytest.mark.parametrize("kind, says", [("directory", "is a directory"), ("fifo", "named pipe"),
                                        ("endless device", "character device"), ("io error", "cannot read")])
def test_a_config_path_that_is_not_a_file(train_main, tmp_path, kind, says):
    path = tmp_path / "cfg.yaml"
    make_unreadable(path, kind)
    result = train_main(["--config", path])
    line = error_line(result)
    assert str(path) in line and says in line and "does not exist" not in line
    assert not result.run_root.exists()


def test_config_dev_null(train_main):
    line = error_line(train_main(["--config", "/dev/null"]))
    assert "/dev/null" in line and "character device" in line and "does not exist" not in line


def test_a_folder_named_like_a_preset_does_not_hide_it(train_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    result = train_main(["--config", "digits", "--print-config"])
    assert result.returncode == 0 and "name: digits" in result.stdout


def test_a_config_file_that_is_not_utf8(train_main, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: caf\u00e9\n".encode("latin-1"))
    line = error_line(train_main(["--config", path]))
    assert str(path) in line and "UTF-8" in line


def test_a_huge_config_file(train_main, tmp_path):
    path = write(tmp_path / "huge.yaml", "base: digits\n" + "# padding\n" * 200_000)
    line = error_line(train_main(["--config", path]))
    assert str(path) in line and "at most" in line


def test_a_key_given_twice(train_main, tmp_path):
    path = write(tmp_path / "twice.yaml", "base: digits\noptim:\n  lr: 0.1\n  momentum: 0.5\n  lr: 0.2\n")
    line = error_line(train_main(["--config", path]))
    assert str(path) in line and "'lr' appears twice" in line and "lines 3 and 5" in line
    line = error_line(train_main(["--config", "digits", "model.kwargs={width: 4, width: 8}"]))
    assert "model.kwargs" in line and "'width' appears twice" in line


def test_a_merge_key_is_not_a_duplicate(train_main, tmp_path):
    """YAML's `<<:` merge may be overridden key by key: that is not a key given twice."""
    path = write(tmp_path / "merge.yaml", "base: digits\noptim:\n  <<: {lr: 0.1, momentum: 0.5}\n  lr: 0.2\n")
    result = train_main(["--config", path, "--print-config"])
    assert result.returncode == 0, result.stderr
    optim = yaml.safe_load(result.stdout)["optim"]
    assert (optim["lr"], optim["momentum"]) == (0.2, 0.5)


def billion_laughs(levels: int = 9) -> str:
    """A flow-style YAML list whose aliases expand to 10**levels values while the text stays short."""
    items = ["&a0 [" + ", ".join(["lol"] * 10) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("where", ["file", "override"])
def test_aliases_that_expand_without_end(train_main, tmp_path, where):
    """A "billion laughs" value: refused quickly, in one short line, whatever key it was given for."""
    if where == "file":
        path = write(tmp_path / "laughs.yaml", f"base: digits\nmodel:\n  kwargs: {{x: {billion_laughs()}}}\n")
        args = ["--config", path, "--print-config"]
    else:
        args = ["--config", "digits", f"data.synthetic_shape={billion_laughs()}"]
    line = error_line(train_main(args))
    assert "100,000 values" in line and len(line) < 600


@pytest.mark.parametrize("text", ["model:\n  kwargs: &k {x: *k}\n", "data:\n  synthetic_shape: &s [1, *s]\n",
                                  "data:\n  synthetic_shape: " + "[" * 3000 + "]" * 3000 + "\n",
                                  "data:\n  synthetic_shape: " + "[" * 40 + "]" * 40 + "\n"])
def test_a_value_nested_too_deep_or_inside_itself(train_main, tmp_path, text):
    path = write(tmp_path / "deep.yaml", "base: digits\n" + text)
    line = error_line(train_main(["--config", path, "--print-config"]))
    assert str(path) in line and "nests deeper than" in line


@pytest.mark.parametrize("text, says", [("run:\n  name: 2024-13-45\n", "month"),
                                        ("train:\n  seed: " + "9" * 5000 + "\n", "4300 digits")])
def test_a_value_yaml_cannot_convert(train_main, tmp_path, text, says):
    path = write(tmp_path / "values.yaml", "base: digits\n" + text)
    line = error_line(train_main(["--config", path]))
    assert str(path) in line and says in line and len(line) < 600


def test_long_values_are_cut_in_the_error_line(train_main):
    line = error_line(train_main(["--config", "digits", "data.name=" + "x" * 100_000]))
    assert "data.name=" in line and len(line) < 600


def test_a_section_check_that_echoes_a_long_value_stays_short(train_main):
    """data.synthetic_shape is checked by its section, which echoes the list: the line keeps both ends."""
    line = error_line(train_main(["--config", "digits", "data.synthetic_shape=[" + "1, " * 20_000 + "1]"]))
    assert line.startswith("error: data.synthetic_shape=") and "[channels, height, width]" in line
    assert len(line) < 1100


def test_synthetic_data_too_large_for_memory(train_main):
    """2**40 images: the allocation fails at once (far beyond memory), and says which keys asked for it."""
    result = train_main(["--config", "digits", "data.name=synthetic", f"data.synthetic_size={2 ** 40}", *QUIET])
    line = error_line(result)
    assert "data.synthetic_size=1099511627776" in line and "memory" in line


def test_a_key_with_a_newline_stays_on_one_line(train_main, tmp_path):
    path = write(tmp_path / "newline.yaml", 'base: digits\n"optim\\nlr": 1\n')
    line = error_line(train_main(["--config", path]))
    assert "optim\\nlr" in line


def test_help_print_config_and_config_errors_need_no_torch(tmp_path):
    """Answered in the time Python and PyYAML take to start: torch is not imported on these paths."""
    bad = write(tmp_path / "twice.yaml", "train:\n  seed: 1\n  seed: 2\n")
    script = ("import sys; from runner.train import main\n"
              f"codes = [main(a) for a in ([\"--help\"], [\"--print-config\"], [\"optim.lr=nan\"], "
              f"[\"--config\", {str(bad)!r}], [\"--config\", \"/dev/null\"])]\n"
              "print(codes, 'torch' in sys.modules)")
    result = subprocess.run([PYTHON, "-c", script], cwd=REPO, env=clean_env(tmp_path), capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[0, 0, 2, 2, 2] False", result.stderr


def test_a_file_in_the_working_directory_does_not_shadow_a_library(tmp_path):
    """A stray yaml.py where the user happens to stand must not run in place of PyYAML."""
    marker = tmp_path / "code_ran"
    (tmp_path / "yaml.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    result = subprocess.run([PYTHON, str(REPO / "runner/train.py"), "--config", "digits", "--print-config"],
                            cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert not marker.exists() and result.returncode == 0, result.stderr[-2000:]
