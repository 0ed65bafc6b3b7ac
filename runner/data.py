"""Data: the `data` config section and the splits a run trains and evaluates on.

Which samples each step sees is decided in runner/order.py; how they reach the device in runner/batches.py;
reading and checking dataset files in runner/datasets.py. This module imports torch only when data is
loaded, so that config errors are reported before the slow import.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runner.config import ConfigError, setting

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from runner.datasets import ImageSet

NAMES = ["digits", "mnist", "fashion_mnist", "cifar10", "synthetic"]


@dataclass
class DataConfig:
    name: str = setting("digits", choices=NAMES, fingerprint=True)
    root: str = "data"
    download: bool = False
    loader: str = setting("device", choices=["device", "torchvision"])
    val_fraction: float = setting(0.0, min=0.0, max=0.5, fingerprint=True) # held out from train; 0 evaluates on test
    crop_padding: int = setting(0, min=0, fingerprint=True)                # random crop: pad, then shift by up to this
    flip: bool = setting(False, fingerprint=True)                          # random horizontal flip
    num_workers: int = setting(0, min=0)                                   # torchvision path only
    pin_memory: bool = False                               # torchvision path only
    persistent_workers: bool = False                       # torchvision path only
    synthetic_size: int = setting(2048, min=1, fingerprint=True)
    synthetic_shape: list[int] = setting([3, 32, 32], fingerprint=True)
    synthetic_classes: int = setting(10, min=2, fingerprint=True)

    def validate(self):
        if len(self.synthetic_shape) != 3 or min(self.synthetic_shape) < 1:
            raise ConfigError(f"data.synthetic_shape={self.synthetic_shape}: expected [channels, height, width]")
        if self.persistent_workers and self.num_workers == 0:
            raise ConfigError("data.persistent_workers=true needs data.num_workers > 0")


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

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    def overfit(self, n: int) -> "Splits":
        """Train and evaluate on the first n training samples: a model that cannot fit them has a bug."""
        import torch

        from runner import datasets

        few = self.train.subset(torch.arange(min(n, len(self.train))))
        return Splits(few, few, self.test, "overfit", self.num_classes, self.mean, self.std,
                      datasets.ImageSetDataset(few))


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    import torch

    from runner import datasets
    from runner.datasets import DataError

    root = Path(cfg.root)
    num_classes = datasets.NUM_CLASSES
    if cfg.name == "digits":
        train, test = datasets.load_digits()
        train_ds = None
    elif cfg.name == "synthetic":
        num_classes = cfg.synthetic_classes
        train, test = datasets.make_synthetic(cfg.synthetic_size, cfg.synthetic_shape, num_classes, seed)
        train_ds = None
    else:
        if not root.is_dir() and not cfg.download:
            raise DataError(f"data.root={cfg.root} does not exist; create it and put the {cfg.name} files "
                            f"there, or set data.download=true")
        load = (datasets.load_cifar10 if cfg.name == "cifar10"
                else lambda r, d, t: datasets.load_mnist_family(cfg.name, r, d, t))
        train, train_ds = load(root, cfg.download, True)
        test, _ = load(root, cfg.download, False)
    datasets.check_labels(f"{cfg.name} train split", train.labels, num_classes)
    datasets.check_labels(f"{cfg.name} test split", test.labels, num_classes)
    mean, std = datasets.NORMALISATION.get(cfg.name) or datasets.channel_stats(train.images)
    eval_set, eval_split = test, "test"
    if cfg.val_fraction > 0:
        # A fixed split (not the training seed), so that runs with different seeds share one val set.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(12345))
        n_val = max(1, int(len(train) * cfg.val_fraction))
        eval_set, eval_split = train.subset(order[:n_val]), "val"
        train = train.subset(order[n_val:])
        train_ds = None
    return Splits(train, eval_set, test, eval_split, num_classes, mean, std,
                  train_ds or datasets.ImageSetDataset(train))
