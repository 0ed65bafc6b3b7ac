"""The `data` config section and the splits a run trains and evaluates on.

This module imports torch only when data is loaded, so that config errors are reported before the slow
import.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from runner.config import setting
from runner.errors import ConfigError, UserError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from runner.data.datasets import ImageSet
    from runner.data.folder_cache import FolderSettings
    from runner.data.folder_scan import FolderScan

NAMES = ["digits", "mnist", "fashion_mnist", "cifar10", "synthetic", "folder"]
CARD = "data.json"  # what a run records of its data: see data_card
IN_MEMORY = ("digits", "synthetic")  # built without reading data.root
DIGITS = [str(i) for i in range(10)]
CLASS_NAMES = {
    "digits": DIGITS, "mnist": DIGITS,
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


@dataclass
class DataConfig:
    name: str = setting("digits", choices=NAMES, fingerprint=True)
    root: str = "data"
    download: bool = False
    loader: str = setting("device", choices=["device", "torchvision"])
    val_fraction: float = setting(0.0, min=0.0, max=0.5, fingerprint=True) # held out from train; 0 evaluates on test
    crop_padding: int = setting(0, min=0, max=1024, fingerprint=True)      # random crop: pad, then shift by up to this
    flip: bool = setting(False, fingerprint=True)                          # random horizontal flip
    num_workers: int = setting(0, min=0)                                   # torchvision path only
    pin_memory: bool = False                               # torchvision path only
    persistent_workers: bool = False                       # torchvision path only
    synthetic_size: int = setting(2048, min=1, fingerprint=True)
    synthetic_shape: list[int] = setting([3, 32, 32], fingerprint=True)
    synthetic_classes: int = setting(10, min=2, max=100_000, fingerprint=True)
    # [H, W], [S] or S (a square): images are resized to it on the way in; [] is the pretrained model's size,
    # else the images' own (folder: the most common training size)
    image_size: list[int] | int = setting([], fingerprint=True)
    mean: list[float] = setting([], fingerprint=True)  # per channel, on 0..1 pixels; [] the pretrained model's,
    std: list[float] = setting([], fingerprint=True)   # else the dataset's (folder: from the training images)
    channels: int = setting(0, choices=[0, 1, 3], fingerprint=True)  # folder: 0 is 3 if any image has colour
    skip_bad_images: bool = setting(False, fingerprint=True)  # folder: skip corrupt files rather than stop
    cache_dir: str = ""                                    # folder: decoded cache; "" is <data.root>/.cache

    def validate(self):
        if self.name in IN_MEMORY and self.root != "data":
            raise ConfigError(f"data.root={self.root} is set, but data.name={self.name} reads no files; "
                              f"use data.name=folder for a folder of images, or drop data.root")
        if isinstance(self.image_size, int):  # a scalar means a square
            self.image_size = [self.image_size, self.image_size]
        folder_only = {"channels": 0, "skip_bad_images": False, "cache_dir": ""}
        set_here = [k for k, default in folder_only.items() if getattr(self, k) != default]
        if self.name != "folder" and set_here:
            raise ConfigError(f"data.{set_here[0]}={getattr(self, set_here[0])} applies to data.name=folder only, "
                              f"not to {self.name}")
        if len(self.image_size) > 2 or any(s < 1 for s in self.image_size):
            raise ConfigError(f"data.image_size={self.image_size}: expected [height, width], [size] or [] "
                              f"(the most common training size)")
        if len(self.synthetic_shape) != 3 or min(self.synthetic_shape) < 1:
            raise ConfigError(f"data.synthetic_shape={self.synthetic_shape}: expected [channels, height, width]")
        if self.persistent_workers and self.num_workers == 0:
            raise ConfigError("data.persistent_workers=true needs data.num_workers > 0")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ConfigError(f"data.mean={self.mean} and data.std={self.std}: expected one value each per channel "
                              f"(both set or both []), every std > 0")


@dataclass
class Splits:
    train: ImageSet
    eval: ImageSet          # the split evaluated during training: val if held out, else test
    test: ImageSet
    eval_split: str         # "val" or "test"
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_dataset: Dataset  # the torchvision-style dataset behind `train`, for the DataLoader path
    class_names: list[str] = field(default_factory=list)  # label i is class_names[i]
    dataset: str = ""       # data.name
    description: str = ""   # where the data came from, for the run's header (folder: files skipped, cache)
    image_size: tuple[int, int] | None = None  # (H, W) the images are resized to on the way in; None: as stored

    @property
    def in_shape(self) -> tuple[int, int, int]:
        channels, *stored = self.train.images.shape[1:]
        return (channels, *(self.image_size or stored))

    def overfit(self, n: int) -> "Splits":
        """Train and evaluate on the first n training samples: a model that cannot fit them has a bug."""
        import torch

        from runner.data import datasets

        few = self.train.subset(torch.arange(min(n, len(self.train))))
        return replace(self, train=few, eval=few, eval_split="overfit", train_dataset=datasets.ImageSetDataset(few))


def load_splits(cfg: DataConfig, seed: int, defaults: dict | None = None, scan: FolderScan | None = None) -> Splits:
    """The splits; `defaults` (image_size, mean, std: a pretrained model's, or a run's data.json) apply where
    data.image_size, data.mean and data.std are not set. `scan`: the folder's listing taken for the run's data
    identity (data.name=folder), or None to list it."""
    import torch

    from runner.data import datasets
    from runner.data.datasets import DataError

    root = Path(cfg.root)
    defaults = defaults or {}
    size = cfg.image_size or defaults.get("image_size") or []
    class_names = CLASS_NAMES.get(cfg.name, [str(i) for i in range(datasets.NUM_CLASSES)])
    stats, val, description = datasets.NORMALISATION.get(cfg.name), None, ""
    if cfg.name == "digits":
        train, test = datasets.load_digits()
        train_ds = None
    elif cfg.name == "synthetic":
        class_names = [str(i) for i in range(cfg.synthetic_classes)]
        train, test = datasets.make_synthetic(cfg.synthetic_size, cfg.synthetic_shape, len(class_names), seed)
        train_ds = None
    elif cfg.name == "folder":
        from runner.data import folder

        found = folder.load(folder_settings(cfg, size), keep_pixels=cfg.loader == "device", found=scan)
        train, val, test = found.splits["train"], found.splits.get("val"), found.splits["test"]
        class_names, description = found.decisions.class_names, found.description
        stats, train_ds = (tuple(found.decisions.mean), tuple(found.decisions.std)), None
    else:
        if not root.is_dir() and not cfg.download:
            raise DataError(f"data.root={cfg.root} does not exist; create it and put the {cfg.name} files "
                            f"there, or set data.download=true")
        load = (datasets.load_cifar10 if cfg.name == "cifar10"
                else lambda r, d, t: datasets.load_mnist_family(cfg.name, r, d, t))
        train, train_ds = load(root, cfg.download, True)
        test, _ = load(root, cfg.download, False)
        class_names = train.class_names or class_names  # as the files name them, where they do
    num_classes = len(class_names)
    datasets.check_labels(f"{cfg.name} train split", train.labels, num_classes)
    datasets.check_labels(f"{cfg.name} test split", test.labels, num_classes)
    mean, std = normalisation(cfg, defaults, train.images.shape[1]) or stats or datasets.channel_stats(train.images)
    eval_set, eval_split = test, "test"
    if val is not None:  # the folder's own val/ split
        eval_set, eval_split = val, "val"
    elif cfg.val_fraction > 0:
        # A fixed split (not the training seed), so that runs with different seeds share one val set.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(12345))
        n_val = max(1, int(len(train) * cfg.val_fraction))
        eval_set, eval_split = train.subset(order[:n_val]), "val"
        train = train.subset(order[n_val:])
        train_ds = None
    return Splits(train, eval_set, test, eval_split, num_classes, mean, std,
                  train_ds or datasets.ImageSetDataset(train), class_names, cfg.name, description,
                  (size[0], size[-1]) if size else None)


def normalisation(cfg: DataConfig, defaults: dict, channels: int) -> tuple[tuple, tuple] | None:
    """data.mean/std as set, else the defaults' (a pretrained colour model's averaged for grey images)."""
    if cfg.mean:
        if len(cfg.mean) != channels:
            raise ConfigError(f"data.mean={cfg.mean} and data.std={cfg.std} have {len(cfg.mean)} values, but the "
                              f"images have {channels} channel(s)")
        return tuple(cfg.mean), tuple(cfg.std)
    if not defaults.get("mean"):
        return None
    mean, std = defaults["mean"], defaults["std"]
    if len(mean) != channels:  # 3 -> 1: the grey image stands for equal R, G and B
        mean, std = [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels
    return tuple(mean), tuple(std)


def folder_settings(cfg: DataConfig, image_size: list[int] | None = None) -> FolderSettings:
    from runner.data.folder_cache import FolderSettings

    size = image_size if image_size is not None else cfg.image_size
    return FolderSettings(cfg.root, tuple(size), cfg.channels, cfg.skip_bad_images, cfg.cache_dir)


def data_card(splits: Splits) -> dict:
    """What prediction needs to preprocess an image exactly as training did (the run's data.json)."""
    return {"class_names": list(splits.class_names), "in_shape": list(splits.in_shape),
            "mean": list(splits.mean), "std": list(splits.std), "dataset": splits.dataset}


def read_data_card(run_dir: Path) -> dict:
    """A run's data.json, checked: the preprocessing it trained with."""
    import json

    path = run_dir / CARD
    try:
        card = json.loads(path.read_text())
        shape = [int(n) for n in card["in_shape"]]
        if len(shape) != 3 or len(card["mean"]) != shape[0] or len(card["std"]) != shape[0] or not card["class_names"]:
            raise ValueError("in_shape, mean, std and class_names disagree")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: it records the preprocessing the run trained with, written "
                        f"when training starts") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is unreadable or malformed ({e})") from None
    return card
