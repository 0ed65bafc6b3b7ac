"""Image folders (runner/data/folder.py and its scan, decoding and cache; runner/prepare_data.py): classes,
sizes and channels, the cache, the lazy torchvision path, and bad folders.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from runner.errors import ConfigError
from runner.data.splits import DataConfig, data_card, load_splits
from runner.prepare_data import main as prepare_data_main

from tests.sample_files import CLASSES, write_folder
from tests.util import REPO, clean_env, error_line, folder_args, run_train, summary, torchrun


def cache_files(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((root / ".cache").glob("folder-*"))}


def newest_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors")


def corrupt(root: Path) -> str:
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return "broken.png"


def truncated(root: Path) -> str:
    data = (root / "train" / "fish" / "001.jpg").read_bytes()
    (root / "train" / "fish" / "cut.jpg").write_bytes(data[:len(data) // 2])
    return "cut.jpg"


def empty_class(root: Path) -> str:
    (root / "train" / "zebra").mkdir()
    (root / "train" / "zebra" / "readme.txt").write_text("images go here")
    return "zebra is an empty class folder"


def unknown_test_class(root: Path) -> str:
    (root / "test" / "cat").rename(root / "test" / "kitten")
    return "class 'kitten' is not in"


def no_train(root: Path) -> str:
    (root / "train").rename(root / "training")
    return "train does not exist"


def no_images(root: Path) -> str:
    for path in sorted(root.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "train").mkdir()
    (root / "test").mkdir()
    return "no class folders"


def missing_root(root: Path) -> str:
    shutil.rmtree(root)
    return "does not exist or is not a folder"


def test_folder_reads_classes_sizes_channels_and_skips_non_images(images):
    from PIL import Image

    splits = load_splits(DataConfig(name="folder", root=str(images)), seed=0)
    assert splits.class_names == CLASSES and splits.num_classes == 3
    assert splits.in_shape == (3, 12, 12)  # colour, and the most common training size
    assert len(splits.train) == 72 and len(splits.test) == 24 and splits.eval_split == "test"
    assert "1 non-image files skipped" in splits.description
    assert sorted(splits.train.labels.tolist()) == sorted([0] * 24 + [1] * 24 + [2] * 24)
    # Files are read in sorted order: train/cat/000.png is the first sample, unresized.
    first = np.array(Image.open(images / "train" / "cat" / "000.png")).transpose(2, 0, 1)
    assert torch.equal(splits.train.images[0], torch.from_numpy(first))
    # Normalisation comes from the training images.
    pixels = splits.train.images.double().div(255)
    assert splits.mean == pytest.approx(pixels.mean((0, 2, 3)).tolist(), abs=1e-9)
    assert splits.std == pytest.approx(pixels.std((0, 2, 3), correction=0).tolist(), abs=1e-9)
    card = data_card(splits)
    assert card == {"class_names": CLASSES, "in_shape": [3, 12, 12], "mean": list(splits.mean),
                    "std": list(splits.std), "dataset": "folder"}


def test_folder_settings_and_val_split(images):
    grey = load_splits(DataConfig(name="folder", root=str(images), channels=1, image_size=[8, 10]), seed=0)
    assert grey.in_shape == (1, 8, 10) and grey.train.images.dtype == torch.uint8
    held_out = load_splits(DataConfig(name="folder", root=str(images), val_fraction=0.25), seed=0)
    assert held_out.eval_split == "val" and len(held_out.eval) == 18 and len(held_out.train) == 54
    (images / "test").rename(images / "val")
    write_folder(images / "new", n_train=1, n_test=2)
    (images / "new" / "test").rename(images / "test")
    own_val = load_splits(DataConfig(name="folder", root=str(images), val_fraction=0.25), seed=0)
    assert own_val.eval_split == "val" and len(own_val.eval) == 24 and len(own_val.test) == 6
    assert len(own_val.train) == 72


def test_builtin_datasets_name_their_classes():
    assert load_splits(DataConfig(name="digits"), seed=0).class_names == [str(i) for i in range(10)]
    synthetic = load_splits(DataConfig(name="synthetic", synthetic_size=64, synthetic_classes=4), seed=0)
    assert synthetic.class_names == ["0", "1", "2", "3"]
    assert data_card(synthetic)["dataset"] == "synthetic"


def test_lazy_files_decode_exactly_the_cached_pixels(images):
    cached = load_splits(DataConfig(name="folder", root=str(images)), seed=0)
    lazy = load_splits(DataConfig(name="folder", root=str(images), loader="torchvision"), seed=0)
    assert not isinstance(lazy.train.images, torch.Tensor)  # decoded on access, not held in memory
    assert lazy.in_shape == cached.in_shape and (lazy.mean, lazy.std) == (cached.mean, cached.std)
    for i in range(len(cached.train)):
        image, label = lazy.train_dataset[i]
        assert torch.equal(image, cached.train.images[i]) and label == int(cached.train.labels[i])
    assert torch.equal(torch.stack([lazy.test.images[i] for i in range(len(lazy.test))]), cached.test.images)


def test_cache_is_built_once_reused_and_rebuilt_when_a_file_changes(images, command):
    first = command(prepare_data_main, ["--config", "digits", "data.name=folder", f"data.root={images}"])
    assert first.returncode == 0, first.stderr
    assert "decoding 96 images" in first.stdout and "cache built" in first.stdout
    built = cache_files(images)
    assert sorted(Path(n).suffix for n in built) == [".json", ".safetensors"]
    assert not list((images / ".cache").glob(".tmp-*"))
    header = json.loads(next((images / ".cache").glob("folder-*.json")).read_text())
    assert header["class_names"] == CLASSES and header["skipped_files"] == 1
    again = load_splits(DataConfig(name="folder", root=str(images)), seed=0)
    assert "cache reused" in again.description and cache_files(images) == built
    os.utime(images / "test" / "dog" / "003.jpg", ns=(1, 1))  # a touched file is a new folder
    changed = load_splits(DataConfig(name="folder", root=str(images)), seed=0)
    assert "cache built" in changed.description
    rebuilt = cache_files(images)
    assert len(rebuilt) == 2 and not set(rebuilt) & set(built)  # the stale cache is removed
    grey = load_splits(DataConfig(name="folder", root=str(images), channels=1), seed=0)
    assert "cache built" in grey.description and set(rebuilt) < set(cache_files(images))  # other settings: kept


@pytest.mark.slow
def test_train_caches_then_reuses_and_both_paths_give_the_same_weights(train_main, images, tmp_path):
    """A first run decodes into the cache; a second reuses it untouched; the DataLoader path (workers
    decoding files, crops and flips per sample) ends with the same weights as the device path."""
    augment = ["data.crop_padding=2", "data.flip=true", "run.name=device"]
    device = train_main(folder_args(images, *augment))
    assert device.returncode == 0, device.stderr[-3000:]
    assert "decoding 96 images" in device.stdout
    built = cache_files(images)
    again = train_main(folder_args(images, *augment, "run.name=again"))
    assert again.returncode == 0 and "decoding" not in again.stdout, again.stdout[-3000:]
    assert cache_files(images) == built
    loader = train_main(folder_args(images, *augment, "run.name=loader", "data.loader=torchvision",
                                    "data.num_workers=1"))
    assert loader.returncode == 0, loader.stderr[-3000:]
    runs = tmp_path / "runs"
    assert summary(runs / "device")["final"]["test"]["accuracy"] > 0.8
    weights = [newest_weights(runs / name) for name in ("device", "again", "loader")]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
        assert torch.allclose(weights[0][key], weights[2][key], rtol=1e-5, atol=1e-6), key


@pytest.mark.slow
def test_two_processes_decode_once(images, tmp_path):
    """The main process builds the cache while the other waits, then reads it: one decode, same data."""
    args = folder_args(images, "run.name=two", "train.micro_batch_size=6")
    result = run_train(args, tmp_path, launcher=torchrun(2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("decoding 96 images") == 1, result.stdout[-3000:]
    assert len(cache_files(images)) == 2 and summary(tmp_path / "runs" / "two")["world_size"] == 2


@pytest.mark.parametrize("damage", [corrupt, truncated, empty_class, unknown_test_class, no_train, no_images,
                                    missing_root])
def test_bad_folder_is_one_line_naming_it(images, command, damage):
    expected = damage(images)
    line = error_line(command(prepare_data_main, ["--config", "digits", "data.name=folder", f"data.root={images}"]))
    assert expected in line and str(images) in line
    assert not list((images / ".cache").glob("folder-*"))  # nothing cached from a bad folder


def test_skip_bad_images_skips_and_counts_them(images):
    corrupt(images)
    truncated(images)
    splits = load_splits(DataConfig(name="folder", root=str(images), skip_bad_images=True), seed=0)
    assert len(splits.train) == 72 and "2 bad images skipped" in splits.description


def test_corrupt_image_stops_training(train_main, images):
    expected = corrupt(images)
    line = error_line(train_main(folder_args(images)))
    assert expected in line and "data.skip_bad_images=true" in line


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_data_root_for_a_dataset_that_reads_no_files(name, tmp_path):
    with pytest.raises(ConfigError, match=f"data.root={tmp_path}.*data.name={name} reads no files"):
        DataConfig(name=name, root=str(tmp_path)).validate()
    DataConfig(name=name).validate()  # the default root is fine


def test_folder_settings_are_refused_for_other_datasets():
    with pytest.raises(ConfigError, match=r"data.channels=3 applies to data.name=folder only"):
        DataConfig(name="mnist", channels=3).validate()
    with pytest.raises(ConfigError, match=r"data.image_size=\[1, 2, 3\]: expected \[height, width\]"):
        DataConfig(name="folder", image_size=[1, 2, 3]).validate()


@pytest.mark.parametrize("script", ["prepare_data.py", "predict.py"])
def test_scripts_run_from_anywhere_and_help_is_quick(script, tmp_path):
    import sys
    import time

    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "runner" / script), "--help"], cwd=tmp_path,
                            env=clean_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "python runner/" in result.stdout, result.stderr
    assert "torch" not in result.stderr and time.perf_counter() - started < 5  # torch is not imported for --help

