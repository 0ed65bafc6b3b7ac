"""Data: datasets read from their real on-disk formats, clear errors for bad files, and the sample order."""
from __future__ import annotations

import pickle
import socket

import numpy as np
import pytest
import torch

from runner.data.batches import DeviceBatches, Normalise
from runner.data.datasets import ImageSet
from runner.data.order import TrainOrder, shard_range
from runner.data.splits import DataConfig, load_splits
from runner.plan import Config, Plan, TrainConfig
from tests.conftest import QUIET
from tests.test_config import error_line
from tests.util import read_jsonl, summary


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


# ---------------------------------------------------------------------------------------------- loading

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


# ---------------------------------------------------------------------------------------------- bad data

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


@pytest.mark.parametrize("args, fragments", [
    (["--config", "mnist", "data.name=cifar10"], ["linear", "cifar10", "3x32x32"]),
    (["--config", "digits", "model.kwargs={in_features: 3072}"], ["linear", "digits", "1x28x28"]),
])
def test_images_that_do_not_fit_the_model_fail_before_training(train_main, cifar_root, args, fragments):
    """E.g. CIFAR's 3x32x32 into the 784-input linear net: one line before any step, no run directory."""
    root = [f"data.root={cifar_root}"] if "data.name=cifar10" in args else []  # digits reads no data.root
    result = train_main(args + root + QUIET)
    line = error_line(result)
    assert all(f in line for f in fragments), line
    assert "step" not in result.stdout
    assert not (result.run_root / args[1]).exists()


# ---------------------------------------------------------------------------------------------- the order

def train_order(n: int, seed: int, global_batch: int, micro: int, world: int, rank: int,
                limit_train_steps: int = 0) -> TrainOrder:
    """The order a run with this batch layout trains in, from its plan's numbers."""
    train = TrainConfig(global_batch_size=global_batch, micro_batch_size=micro, limit_train_steps=limit_train_steps)
    return TrainOrder(Plan.resolve(Config(train=train), world).for_train_size(n), n, seed, rank)


@pytest.mark.parametrize("n", [100, 257])
def test_train_order_is_the_same_for_any_world_and_accumulation(n):
    """The samples behind each optimizer step depend only on (seed, epoch, step), and ranks are disjoint."""
    micro_for_world = {1: 4, 2: 4, 4: 4}  # global 16 = micro 4 x accumulation x world
    steps_by_layout = {}
    for world, accumulation in ((1, 4), (2, 2), (4, 1)):
        micro = micro_for_world[world]
        global_batch = micro * world * accumulation
        per_rank = []
        for rank in range(world):
            order = train_order(n, seed=5, global_batch=global_batch, micro=micro, world=world, rank=rank)
            assert order.accumulation == accumulation and order.steps_per_epoch == n // global_batch
            micro_batches = list(order.micro_batches(epoch=2))
            assert len(micro_batches) == order.steps_per_epoch * accumulation
            assert all(len(b) == micro for b in micro_batches)
            per_rank.append([torch.cat(micro_batches[s * accumulation:(s + 1) * accumulation])
                             for s in range(order.steps_per_epoch)])
        steps = []
        for s in range(n // global_batch):
            shards = [per_rank[r][s] for r in range(world)]
            together = torch.cat(shards)
            assert len(set(together.tolist())) == global_batch  # disjoint rank shards, no repeats
            steps.append(sorted(together.tolist()))
        steps_by_layout[(world, accumulation)] = steps
    layouts = list(steps_by_layout.values())
    assert layouts[0] == layouts[1] == layouts[2]
    used = [i for step in layouts[0] for i in step]
    assert len(set(used)) == len(used) and all(0 <= i < n for i in used)  # each sample at most once per epoch


def test_train_order_changes_with_epoch_and_seed_and_resumes_mid_epoch():
    order = train_order(64, seed=1, global_batch=8, micro=4, world=1, rank=0)
    epoch0 = torch.cat(list(order.micro_batches(0)))
    assert sorted(epoch0.tolist()) == list(range(64))
    assert not torch.equal(epoch0, torch.cat(list(order.micro_batches(1))))
    other_seed = train_order(64, seed=2, global_batch=8, micro=4, world=1, rank=0)
    assert not torch.equal(epoch0, torch.cat(list(other_seed.micro_batches(0))))
    resumed = torch.cat(list(order.micro_batches(0, start_step=3)))
    assert torch.equal(resumed, epoch0[3 * 8:])
    limited = train_order(64, seed=1, global_batch=8, micro=4, world=1, rank=0, limit_train_steps=2)
    assert limited.steps_per_epoch == 2 and torch.equal(torch.cat(list(limited.micro_batches(0))), epoch0[:16])


@pytest.mark.parametrize("n", [0, 1, 5, 7, 10, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shard_range_covers_each_index_exactly_once(n, world):
    shards = [shard_range(n, world, rank) for rank in range(world)]
    covered = [i for shard in shards for i in shard]
    assert covered == list(range(n))  # contiguous, in rank order, no gaps or overlaps
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------------------------------------- augmentation

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


# ---------------------------------------------------------------------------------------------- loaders

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


def test_top5_accuracy_is_not_merged_with_top1():
    """A first batch that is all correct must not tie top-5 to top-1 for the rest of the evaluation."""
    import contextlib

    import torch

    from runner.metrics import Evaluator

    logits = torch.tensor([[9.0, 1, 0, 0, 0, 0, 0, 0, 0, 0]] * 4 + [[0.0, 9, 8, 7, 6, 5, 0, 0, 0, 0]] * 4)
    labels = torch.tensor([0] * 4 + [3] * 4)  # second half: top-1 wrong, top-5 right
    model = torch.nn.Identity()
    batches = [(logits[:4], labels[:4]), (logits[4:], labels[4:])]
    results = Evaluator(10, "cpu").run(model, batches, contextlib.nullcontext)
    assert results["accuracy"] == 0.5 and results["top5_accuracy"] == 1.0 and results["samples"] == 8


def test_per_sample_bits_match_the_batched_ones():
    from runner.data.order import sample_bits, sample_bits_one

    index = torch.tensor([0, 1, 7, 49_999, 1 << 20])
    for seed, epoch in ((0, 0), (3, 11), (12345, 2)):
        batched = sample_bits(seed, epoch, index)
        for i, bits in zip(index.tolist(), batched.tolist()):
            assert sample_bits_one(seed, epoch, i) & ((1 << 63) - 1) == bits & ((1 << 63) - 1)
