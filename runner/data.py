"""Data: which samples each step sees, and how they reach the device.

The global sample order and every augmentation draw are pure functions of (seed, epoch, sample index).
Each optimizer step consumes the next `global_batch_size` samples of that order, split into
`accumulation` micro-steps of `micro_batch_size` samples per rank. So the samples behind an optimizer step
do not depend on the world size, the worker count or a resume: a resumed run and a run on another number
of processes see exactly the same batches, with the same augmentations.

Two paths deliver those batches:
- `device` (default for in-memory datasets): the uint8 dataset sits on the device once; each micro-step
  gathers its indices, crops/flips the whole batch in one gather and normalises it there.
- `torchvision`: a DataLoader with workers over the torchvision dataset and per-sample transforms, for
  user datasets and image folders.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from runner import datasets
from runner.config import ConfigError, setting
from runner.datasets import DataError, ImageSet

NAMES = ["digits", "mnist", "fashion_mnist", "cifar10", "synthetic"]


@dataclass
class DataConfig:
    name: str = setting("digits", choices=NAMES)
    root: str = "data"
    download: bool = False
    loader: str = setting("device", choices=["device", "torchvision"])
    val_fraction: float = setting(0.0, min=0.0, max=0.5)   # held out from train; 0 evaluates on test
    crop_padding: int = setting(0, min=0)                  # random crop: pad, then shift by up to this
    flip: bool = False                                     # random horizontal flip
    num_workers: int = setting(0, min=0)                   # torchvision path only
    pin_memory: bool = False                               # torchvision path only
    persistent_workers: bool = False                       # torchvision path only
    synthetic_size: int = setting(2048, min=1)
    synthetic_shape: list[int] = setting([3, 32, 32])
    synthetic_classes: int = setting(10, min=2)

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
        few = self.train.subset(torch.arange(min(n, len(self.train))))
        return Splits(few, few, self.test, "overfit", self.num_classes, self.mean, self.std,
                      datasets.ImageSetDataset(few))


def load_splits(cfg: DataConfig, seed: int) -> Splits:
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


# ---------------------------------------------------------------------------------------------- order

def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic; shifts masked to be logical)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def sample_key(seed: int, epoch: int) -> int:
    return ((seed * 1_000_003 + epoch) * 2_654_435_761) % (1 << 40)


def sample_bits(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """64 random bits per sample, a pure function of (seed, epoch, sample index)."""
    return mix64(index.long() * 0x9E3779B9 + sample_key(seed, epoch))


def sample_bits_one(seed: int, epoch: int, index: int) -> int:
    """sample_bits for one sample in plain Python (its low 63 bits are the same): the per-sample
    DataLoader path would spend longer on a dozen tiny tensor ops than on the crop itself."""
    mask = (1 << 64) - 1
    x = (index * 0x9E3779B9 + sample_key(seed, epoch)) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


class TrainOrder:
    """Which samples each rank uses at each micro-step: a pure function of (seed, epoch, step)."""

    def __init__(self, num_samples: int, seed: int, global_batch: int, micro_batch: int, world: int, rank: int,
                 max_steps_per_epoch: int = 0):
        self.num_samples, self.seed = num_samples, seed
        self.global_batch, self.micro_batch, self.world, self.rank = global_batch, micro_batch, world, rank
        self.accumulation = global_batch // (micro_batch * world)
        # Whole accumulation windows only: a partial window would be under-weighted (see the notes).
        self.steps_per_epoch = num_samples // global_batch
        if max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, max_steps_per_epoch)

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + epoch))

    def rank_rows(self, epoch: int, start_step: int = 0, device=None) -> torch.Tensor:
        """This rank's sample indices for the rest of the epoch, one row per micro-step.

        Micro-step k of a step covers the next micro_batch x world samples of the order; rank r takes the
        r-th micro_batch of them."""
        perm = self.permutation(epoch).to(device)
        rest = perm[start_step * self.global_batch:self.steps_per_epoch * self.global_batch]
        return rest.view(-1, self.world, self.micro_batch)[:, self.rank]

    def micro_batches(self, epoch: int, start_step: int = 0, device=None) -> Iterator[torch.Tensor]:
        yield from self.rank_rows(epoch, start_step, device)


def shard_range(n: int, world: int, rank: int) -> range:
    """Contiguous, disjoint, possibly uneven shards: evaluation counts each sample exactly once."""
    return range(n * rank // world, n * (rank + 1) // world)


# ---------------------------------------------------------------------------------------------- batches

def crop_flip(x: torch.Tensor, bits: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """Random crop (zero-pad by `pad`, shift by up to `pad`) and horizontal flip of a uint8 batch, drawn
    from each sample's random bits, as one gather: no per-sample Python."""
    b, c, h, w = x.shape
    dy = (bits & 0xFF) % (2 * pad + 1)
    dx = ((bits >> 8) & 0xFF) % (2 * pad + 1)
    cols = torch.arange(w, device=x.device).expand(b, w)
    if flip:
        cols = torch.where(((bits >> 16) & 1).bool()[:, None], (w - 1) - cols, cols)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
    rows = torch.arange(h, device=x.device)[None, :] + dy[:, None]
    cols = cols + dx[:, None]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


class Normalise:
    """uint8 images to normalised float32 on the device, in two kernels."""

    def __init__(self, mean, std, device, channels_last: bool = False):
        c = len(mean)
        self.scale = 1 / (torch.tensor(std, device=device).view(1, c, 1, 1) * 255)
        self.bias = -torch.tensor(mean, device=device).view(1, c, 1, 1) / torch.tensor(std, device=device).view(
            1, c, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, x.float(), self.scale).contiguous(memory_format=self.memory_format)


CHUNK_SAMPLES = 4096  # samples prepared at once on the device path


class DeviceBatches:
    """The whole uint8 split lives on the device; each micro-batch is an index gather, a crop/flip gather
    and a normalise."""

    def __init__(self, split: ImageSet, normalise: Normalise, device, seed: int = 0, crop_padding: int = 0,
                 flip: bool = False):
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.normalise, self.device, self.seed, self.pad, self.flip = normalise, device, seed, crop_padding, flip
        self.eval_sets: dict[ImageSet, tuple[torch.Tensor, torch.Tensor]] = {}

    def batch(self, index: torch.Tensor, epoch: int):
        x = self.images[index]
        if self.pad or self.flip:
            x = crop_flip(x, sample_bits(self.seed, epoch, index), self.pad, self.flip)
        return self.normalise(x), self.labels[index]

    def train_epoch(self, order: TrainOrder, epoch: int, start_step: int = 0):
        """Prepares CHUNK_SAMPLES at a time (one gather, crop/flip and normalise for many micro-steps), then
        hands out views: a small model would otherwise wait on a handful of tiny kernels per step."""
        rows = order.rank_rows(epoch, start_step, self.device)
        per_chunk = max(1, CHUNK_SAMPLES // order.micro_batch)
        for begin in range(0, len(rows), per_chunk):
            block = rows[begin:begin + per_chunk]
            x, y = self.batch(block.flatten(), epoch)
            yield from zip(x.split(order.micro_batch), y.split(order.micro_batch))

    def eval_batches(self, split: ImageSet, index: torch.Tensor, batch_size: int):
        if split not in self.eval_sets:
            self.eval_sets[split] = (split.images.to(self.device), split.labels.to(self.device))
        images, labels = self.eval_sets[split]
        index = index.to(self.device)
        for begin in range(0, len(index), batch_size):
            part = index[begin:begin + batch_size]
            yield self.normalise(images[part]), labels[part]


class KeyedDataset(Dataset):
    """Looks samples up by (epoch, index) keys and crops/flips each one with the same random bits as the
    device path (crop_flip), so both paths train on identical batches, whatever the workers, ranks or
    resumes."""

    def __init__(self, base: Dataset, seed: int, pad: int = 0, flip: bool = False):
        self.base, self.seed, self.pad, self.flip = base, seed, pad, flip

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        from torchvision.transforms.v2.functional import pil_to_tensor

        epoch, index = key
        image, label = self.base[index]
        if not isinstance(image, torch.Tensor):
            image = pil_to_tensor(image)
        if image.ndim == 2:
            image = image[None]
        if epoch is not None and (self.pad or self.flip):
            bits, p = sample_bits_one(self.seed, epoch, index), self.pad
            dy, dx = (bits & 0xFF) % (2 * p + 1), ((bits >> 8) & 0xFF) % (2 * p + 1)
            h, w = image.shape[1:]
            if p:
                image = torch.nn.functional.pad(image, (p, p, p, p))[:, dy:dy + h, dx:dx + w]
            if self.flip and (bits >> 16) & 1:
                image = image.flip(-1)
            image = image.contiguous()
        return image, label


class OrderBatchSampler(Sampler):
    """Feeds a DataLoader this rank's micro-batches of TrainOrder; set `epoch`/`start_step` before iterating
    (it runs in the main process, so this works with persistent workers too)."""

    def __init__(self, order: TrainOrder):
        self.order, self.epoch, self.start_step = order, 0, 0

    def __iter__(self):
        for index in self.order.micro_batches(self.epoch, self.start_step):
            yield [(self.epoch, int(i)) for i in index]

    def __len__(self):
        return (self.order.steps_per_epoch - self.start_step) * self.order.accumulation


class LoaderBatches:
    """A DataLoader with workers over the torchvision dataset; workers decode and augment uint8 samples,
    the device normalises whole batches."""

    def __init__(self, cfg: DataConfig, splits: Splits, order: TrainOrder, normalise: Normalise, device,
                 seed: int, augment: bool):
        self.cfg, self.normalise, self.device = cfg, normalise, device
        self.sampler = OrderBatchSampler(order)
        train = KeyedDataset(splits.train_dataset, seed, cfg.crop_padding if augment else 0, cfg.flip and augment)
        self.train_loader = DataLoader(train, batch_sampler=self.sampler, num_workers=cfg.num_workers,
                                       pin_memory=cfg.pin_memory, persistent_workers=cfg.persistent_workers)

    def to_device(self, x, y):
        return self.normalise(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)

    def train_epoch(self, order: TrainOrder, epoch: int, start_step: int = 0):
        self.sampler.epoch, self.sampler.start_step = epoch, start_step
        for x, y in self.train_loader:
            yield self.to_device(x, y)

    def eval_batches(self, split: ImageSet, index: torch.Tensor, batch_size: int):
        keys = [(None, int(i)) for i in index]
        dataset = KeyedDataset(datasets.ImageSetDataset(split), 0)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=keys, num_workers=self.cfg.num_workers,
                            pin_memory=self.cfg.pin_memory)
        for x, y in loader:
            yield self.to_device(x, y)


def make_batches(cfg: DataConfig, splits: Splits, order: TrainOrder, device, seed: int, augment: bool,
                 channels_last: bool):
    normalise = Normalise(splits.mean, splits.std, device, channels_last)
    if cfg.loader == "device":
        return DeviceBatches(splits.train, normalise, device, seed, cfg.crop_padding if augment else 0,
                             cfg.flip and augment)
    return LoaderBatches(cfg, splits, order, normalise, device, seed, augment)
