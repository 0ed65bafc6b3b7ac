"""Datasets and data files (runner/data/splits.py, runner/data/datasets.py, runner/data/batches.py): reading
the real on-disk formats, the two data paths, augmentation, and bad or untrusted data files: missing,
truncated, wrong magic numbers, crafted pickles, files that are not regular files, IDX headers that declare
nothing, a `processed/` folder planted beside the checked MNIST files.
"""
from __future__ import annotations

import builtins
import os
import pickle
import shlex
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from runner.data.batches import DeviceBatches, Normalise
from runner.data.splits import DataConfig, load_splits
from runner.data.datasets import ImageSet, load_cifar10

from tests.util import QUIET, error_line, make_unreadable, read_jsonl, summary


def read_idx(path) -> np.ndarray:
    """An independent reader of the IDX format, to check what the runner loaded."""
    data = path.read_bytes()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_cifar(base, names):
    images, labels = [], []
    for name in names:
        with open(base / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images.append(np.asarray(entry["data"]).reshape(-1, 3, 32, 32))
        labels += list(entry["labels"])
    return np.concatenate(images), np.array(labels)


def raw_batches(images: ImageSet, **kwargs) -> DeviceBatches:
    """DeviceBatches with mean 0 and std 1/255, so its output is the uint8 pixels as floats."""
    c = images.images.shape[1]
    cpu = torch.device("cpu")
    return DeviceBatches(images, Normalise((0.0,) * c, (1 / 255,) * c, cpu), cpu, **kwargs)


@pytest.fixture
def image_set():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (40, 3, 8, 10), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.randint(0, 10, (40,), generator=g))


CIFAR = "cifar-10-batches-py"


def files_under(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if not p.is_dir()] if Path(root).exists() else []


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
    root = copy_data(mnist_root)
    processed = root / "MNIST" / "processed"
    processed.mkdir()
    for name, n in (("training.pt", 256), ("test.pt", 100)):
        torch.save((torch.full((n, 28, 28), 7, dtype=torch.uint8), torch.zeros(n, dtype=torch.long)), processed / name)
    splits = load_splits(DataConfig(name="mnist", root=str(root)), seed=0)
    raw = (root / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()
    expected = torch.from_numpy(np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28).copy())
    assert torch.equal(splits.train.images, expected)


def test_synthetic_data_too_large_for_memory(train_main):
    """2**40 images: the allocation fails at once (far beyond memory), and says which keys asked for it."""
    result = train_main(["--config", "digits", "data.name=synthetic", f"data.synthetic_size={2 ** 40}", *QUIET])
    line = error_line(result)
    assert "data.synthetic_size=1099511627776" in line and "memory" in line


def test_digits_loads_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("digits must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    splits = load_splits(DataConfig(name="digits"), seed=0)
    assert splits.in_shape == (1, 28, 28) and splits.num_classes == 10
    assert len(splits.train) + len(splits.test) == 1797 and len(splits.test) == 1797 // 5
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.max() > 200
    assert set(splits.train.labels.tolist()) == set(range(10))
    assert splits.eval is splits.test and splits.eval_split == "test"


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_reads_the_idx_files(request, name, folder):
    root = request.getfixturevalue("mnist_root" if name == "mnist" else "fashion_mnist_root")
    splits = load_splits(DataConfig(name=name, root=str(root)), seed=0)
    raw = root / folder / "raw"
    for split, prefix in ((splits.train, "train"), (splits.test, "t10k")):
        images, labels = read_idx(raw / f"{prefix}-images-idx3-ubyte"), read_idx(raw / f"{prefix}-labels-idx1-ubyte")
        assert split.images.shape == (len(images), 1, 28, 28) and split.images.dtype == torch.uint8
        assert torch.equal(split.images[:, 0], torch.from_numpy(images.copy()))
        assert torch.equal(split.labels, torch.from_numpy(labels.astype(np.int64)))
    assert splits.in_shape == (1, 28, 28) and splits.num_classes == 10


def test_cifar10_reads_the_python_batches_without_official_md5s(cifar_root):
    """The tiny batches' md5s differ from the official ones; they must load anyway (data and meta)."""
    splits = load_splits(DataConfig(name="cifar10", root=str(cifar_root)), seed=0)
    base = cifar_root / "cifar-10-batches-py"
    for split, names in ((splits.train, [f"data_batch_{i}" for i in range(1, 6)]), (splits.test, ["test_batch"])):
        images, labels = read_cifar(base, names)
        assert split.images.shape == images.shape and split.images.dtype == torch.uint8
        assert torch.equal(split.images, torch.from_numpy(images.copy()))
        assert split.labels.tolist() == labels.tolist()
    assert splits.in_shape == (3, 32, 32)


def test_val_fraction_holds_out_part_of_train(mnist_root):
    full = load_splits(DataConfig(name="mnist", root=str(mnist_root)), seed=0)
    held = load_splits(DataConfig(name="mnist", root=str(mnist_root), val_fraction=0.25), seed=3)
    assert held.eval_split == "val" and len(held.eval) == len(full.train) // 4
    assert len(held.train) + len(held.eval) == len(full.train)
    assert torch.equal(held.test.labels, full.test.labels)


def test_missing_data_root(train_main, tmp_path):
    missing = tmp_path / "no_such_dir"
    line = error_line(train_main(["--config", "mnist", f"data.root={missing}", *QUIET]))
    assert f"data.root={missing}" in line and "does not exist" in line


@pytest.mark.parametrize("missing", ["train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_missing_mnist_file_names_it_and_where_to_put_it(train_main, mnist_root, copy_data, missing):
    root = copy_data(mnist_root)
    (root / "MNIST" / "raw" / missing).unlink()
    line = error_line(train_main(["--config", "mnist", f"data.root={root}", *QUIET]))
    assert missing in line and str(root / "MNIST" / "raw") in line


@pytest.mark.parametrize("missing", ["data_batch_2", "test_batch", "batches.meta"])
def test_missing_cifar_file_names_it_and_where_to_put_it(train_main, cifar_root, copy_data, missing):
    root = copy_data(cifar_root)
    (root / "cifar-10-batches-py" / missing).unlink()
    line = error_line(train_main(["--config", "cifar10", f"data.root={root}", *QUIET]))
    assert missing in line and str(root / "cifar-10-batches-py") in line


def test_gzipped_mnist_file_says_to_gunzip_it(train_main, mnist_root, copy_data):
    import gzip

    root = copy_data(mnist_root)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    line = error_line(train_main(["--config", "mnist", f"data.root={root}", *QUIET]))
    assert path.name in line and "gunzip" in line


def test_idx_images_and_labels_that_disagree_in_count(train_main, mnist_root, copy_data):
    root = copy_data(mnist_root)
    labels = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    data = labels.read_bytes()
    labels.write_bytes((0x0801).to_bytes(4, "big") + (200).to_bytes(4, "big") + data[8:8 + 200])  # a valid file
    line = error_line(train_main(["--config", "mnist", f"data.root={root}", *QUIET]))
    assert str(labels) in line and "256" in line and "200" in line


def test_truncated_idx_as_a_process(cli, mnist_root, copy_data):
    """The real script: exit 2, one line naming the file, and the file left as it was."""
    root = copy_data(mnist_root)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    before = path.read_bytes()
    line = error_line(cli(["--config", "mnist", f"data.root={root}", *QUIET]))
    assert str(path) in line and "truncated" in line
    assert path.read_bytes() == before


@pytest.mark.parametrize("file, cut", [("t10k-labels-idx1-ubyte", 6), ("train-labels-idx1-ubyte", 20)])
def test_truncated_idx(train_main, mnist_root, copy_data, file, cut):
    root = copy_data(mnist_root)
    path = root / "MNIST" / "raw" / file
    path.write_bytes(path.read_bytes()[:cut])
    line = error_line(train_main(["--config", "mnist", f"data.root={root}", *QUIET]))
    assert str(path) in line and "truncated" in line


def test_idx_with_a_wrong_magic_number(train_main, mnist_root, copy_data):
    root = copy_data(mnist_root)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    data = path.read_bytes()
    path.write_bytes((0x0801).to_bytes(4, "big") + data[4:])  # says 1-d: e.g. a labels file renamed
    line = error_line(train_main(["--config", "mnist", f"data.root={root}", *QUIET]))
    assert str(path) in line and "magic number" in line and "0x00000801" in line


def test_truncated_cifar_pickle(train_main, cifar_root, copy_data):
    root = copy_data(cifar_root)
    path = root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:3000])
    before = path.read_bytes()
    line = error_line(train_main(["--config", "cifar10", f"data.root={root}", *QUIET]))
    assert str(path) in line and "truncated" in line
    assert path.read_bytes() == before


def test_mnist_label_out_of_range(train_main, mnist_root, copy_data):
    root = copy_data(mnist_root)
    path = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[8 + 17] = 12  # header is 8 bytes; sample 17 gets label 12
    path.write_bytes(bytes(data))
    line = error_line(train_main(["--config", "mnist", f"data.root={root}", *QUIET]))
    assert "12" in line and "train" in line and "0..9" in line


def test_cifar_label_out_of_range(train_main, cifar_root, copy_data):
    root = copy_data(cifar_root)
    path = root / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry["labels"][5] = 12
    with open(path, "wb") as f:
        pickle.dump(entry, f)
    line = error_line(train_main(["--config", "cifar10", f"data.root={root}", *QUIET]))
    assert "12" in line and "test" in line and "0..9" in line


def test_augmentation_off_leaves_images_unchanged(image_set):
    batches = raw_batches(image_set, seed=3, crop_padding=0, flip=False)
    index = torch.tensor([5, 0, 39, 17])
    x, y = batches.batch(index, epoch=4)
    assert torch.allclose(x, image_set.images[index].float(), atol=1e-3)
    assert torch.equal(y, image_set.labels[index])
    # and the normalisation with real statistics is (x/255 - mean) / std
    cpu = torch.device("cpu")
    normed = DeviceBatches(image_set, Normalise((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), cpu), cpu)
    x, _ = normed.batch(index, epoch=0)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(x, (image_set.images[index].float() / 255 - mean) / std, atol=1e-4)


def test_augmentation_is_a_pure_function_of_seed_epoch_index(image_set):
    index = torch.arange(40)
    a = raw_batches(image_set, seed=7, crop_padding=2, flip=True)
    b = raw_batches(image_set, seed=7, crop_padding=2, flip=True)
    x, _ = a.batch(index, epoch=1)
    assert torch.equal(x, a.batch(index, epoch=1)[0])  # same call again
    assert torch.equal(x, b.batch(index, epoch=1)[0])  # a fresh instance (another process, a resume)
    # a sample's draw does not depend on which batch it lands in, nor its position in it
    part = torch.tensor([31, 2, 17])
    assert torch.equal(b.batch(part, epoch=1)[0], x[part])
    assert not torch.equal(x, a.batch(index, epoch=2)[0])  # a new epoch draws again
    other_seed = raw_batches(image_set, seed=8, crop_padding=2, flip=True)
    assert not torch.equal(x, other_seed.batch(index, epoch=1)[0])


def test_crop_and_flip_are_real_crops_and_flips(image_set):
    pad = 2
    index = torch.arange(40)
    x, _ = raw_batches(image_set, seed=11, crop_padding=pad, flip=True).batch(index, epoch=0)
    padded = torch.nn.functional.pad(image_set.images.float(), (pad, pad, pad, pad))
    h, w = image_set.images.shape[2:]
    flips, shifts = 0, set()
    for i in range(40):
        matches = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (False, True)
                   if torch.equal(x[i], (lambda win: win.flip(-1) if f else win)(
                       padded[i, :, dy:dy + h, dx:dx + w]))]
        assert matches, f"sample {i} is not a crop (+flip) of its padded image"
        flips += matches[0][2]
        shifts.add(matches[0][:2])
    assert 0 < flips < 40 and len(shifts) > 3  # both flipped and unflipped samples, several offsets
    flip_only, _ = raw_batches(image_set, seed=11, crop_padding=0, flip=True).batch(index, epoch=0)
    for i in range(40):
        original = image_set.images[i].float()
        assert torch.equal(flip_only[i], original) or torch.equal(flip_only[i], original.flip(-1))


def test_torchvision_loader_path_trains(train_main, mnist_root, tmp_path):
    """The DataLoader path trains on the same batches as the device path: same losses, same result."""
    common = ["--config", "mnist", f"data.root={mnist_root}", "data.val_fraction=0", "train.epochs=1",
              "log.every_steps=1", *QUIET]
    device = train_main(common, run_root=tmp_path / "device")
    loader = train_main(common + ["data.loader=torchvision"], run_root=tmp_path / "loader")
    assert device.returncode == 0 and loader.returncode == 0, loader.stderr
    assert "torchvision path" in loader.stdout and "device path" in device.stdout
    losses = {}
    for name, result in (("device", device), ("loader", loader)):
        records = read_jsonl(result.run_root / "mnist" / "metrics.jsonl")
        losses[name] = [r["metrics"]["loss"] for r in records if r["split"] == "train"]
    assert len(losses["loader"]) == 256 // 32
    assert losses["loader"] == pytest.approx(losses["device"], rel=1e-4)
    s_device, s_loader = summary(device.run_root / "mnist"), summary(loader.run_root / "mnist")
    assert s_loader["final"]["test"]["samples"] == 100
    assert s_loader["final"]["test"]["loss"] == pytest.approx(s_device["final"]["test"]["loss"], rel=1e-4)


def test_torchvision_loader_path_with_augmentation_and_workers(train_main, cifar_root, tmp_path):
    """With crops and flips and a worker process, the DataLoader path still trains on exactly the device
    path's batches: both end with the same weights."""
    from safetensors.torch import load_file

    common = ["--config", "cifar10", f"data.root={cifar_root}", "data.val_fraction=0",
              "model.kwargs={width: 4, hidden: 16}", "data.crop_padding=4", "data.flip=true", "train.epochs=2",
              "train.global_batch_size=16", *QUIET]
    device = train_main(common, run_root=tmp_path / "device")
    loader = train_main(common + ["data.loader=torchvision", "data.num_workers=1"], run_root=tmp_path / "loader")
    assert device.returncode == 0 and loader.returncode == 0, loader.stderr
    weights = [load_file(sorted((r.run_root / "cifar10" / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
               for r in (device, loader)]
    for key in weights[0]:
        assert torch.allclose(weights[0][key], weights[1][key], rtol=1e-5, atol=1e-6), key
    assert summary(loader.run_root / "cifar10")["steps"] == 2 * (200 // 16)


def test_fashion_mnist_trains(train_main, fashion_mnist_root):
    result = train_main(["--config", "mnist", "data.name=fashion_mnist", f"data.root={fashion_mnist_root}",
                         "data.val_fraction=0", "train.epochs=1", *QUIET])
    assert result.returncode == 0, result.stderr
    s = summary(result.run_root / "mnist")
    assert s["steps"] == 256 // 32 and s["final"]["test"]["samples"] == 100

