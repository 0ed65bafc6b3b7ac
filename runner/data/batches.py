"""How a step's samples reach the device. Two paths deliver the same batches (order.py decides which samples):

- `device` (default for in-memory datasets): the uint8 dataset sits on the device once; each micro-step
  gathers its indices, crops/flips the whole batch in one gather and normalises it there.
- `torchvision`: a DataLoader with workers over a torchvision-style dataset, for data that does not fit in
  memory; workers decode and crop/flip with the same per-sample bits.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from runner.data.datasets import ImageSet, ImageSetDataset
from runner.data.order import TrainOrder, sample_bits, sample_bits_one
from runner.data.splits import DataConfig, Splits


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
    """uint8 images to normalised float32 on the device, in two kernels; resized first (bilinear, antialiased
    as Pillow's) where the run's image size differs from the stored one."""

    def __init__(self, mean, std, device, channels_last: bool = False, size: tuple[int, int] | None = None):
        c = len(mean)
        self.size = tuple(size) if size else None
        self.scale = 1 / (torch.tensor(std, device=device).view(1, c, 1, 1) * 255)
        self.bias = -torch.tensor(mean, device=device).view(1, c, 1, 1) / torch.tensor(std, device=device).view(
            1, c, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.size and tuple(x.shape[-2:]) != self.size:
            x = torch.nn.functional.interpolate(x, self.size, mode="bilinear", antialias=True, align_corners=False)
        return torch.addcmul(self.bias, x, self.scale).contiguous(memory_format=self.memory_format)


CHUNK_SAMPLES = 4096  # samples prepared at once on the device path


class DeviceBatches:
    """The whole uint8 split lives on the device; each micro-batch is an index gather, a crop/flip gather
    and a normalise."""

    def __init__(self, split: ImageSet, normalise: Normalise, device, seed: int = 0, crop_padding: int = 0,
                 flip: bool = False, order: TrainOrder | None = None):
        self.order = order
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.normalise, self.device, self.seed, self.pad, self.flip = normalise, device, seed, crop_padding, flip
        self.eval_sets: dict[ImageSet, tuple[torch.Tensor, torch.Tensor]] = {}

    def regroup(self, plan) -> None:
        self.order = self.order.regrouped(plan)

    def batch(self, index: torch.Tensor, epoch: int):
        x = self.images[index]
        if self.pad or self.flip:
            x = crop_flip(x, sample_bits(self.seed, epoch, index), self.pad, self.flip)
        return self.normalise(x), self.labels[index]

    def train_epoch(self, epoch: int, start_step: int = 0):
        """Prepares CHUNK_SAMPLES at a time (one gather, crop/flip and normalise for many micro-steps), then
        hands out views: a small model would otherwise wait on a handful of tiny kernels per step."""
        order = self.order
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
        epoch, index = key
        image, label = self.base[index]  # a uint8 [C, H, W] tensor: ImageSetDataset's, decoded or in memory
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

    def __init__(self, cfg: DataConfig, splits: Splits, order: TrainOrder | None, normalise: Normalise, device,
                 seed: int, augment: bool):
        self.cfg, self.normalise, self.device = cfg, normalise, device
        if order is not None:  # evaluation alone has no training order and needs no training loader
            self.sampler = OrderBatchSampler(order)
            train = KeyedDataset(splits.train_dataset, seed, cfg.crop_padding if augment else 0,
                                 cfg.flip and augment)
            self.train_loader = DataLoader(train, batch_sampler=self.sampler, num_workers=cfg.num_workers,
                                           pin_memory=cfg.pin_memory, persistent_workers=cfg.persistent_workers)

    def regroup(self, plan) -> None:
        """Takes effect at the next train_epoch: the sampler runs in the main process."""
        self.sampler.order = self.sampler.order.regrouped(plan)

    def to_device(self, x, y):
        return self.normalise(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)

    def train_epoch(self, epoch: int, start_step: int = 0):
        self.sampler.epoch, self.sampler.start_step = epoch, start_step
        for x, y in self.train_loader:
            yield self.to_device(x, y)

    def eval_batches(self, split: ImageSet, index: torch.Tensor, batch_size: int):
        keys = [(None, int(i)) for i in index]
        dataset = KeyedDataset(ImageSetDataset(split), 0)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=keys, num_workers=self.cfg.num_workers,
                            pin_memory=self.cfg.pin_memory)
        for x, y in loader:
            yield self.to_device(x, y)


def make_batches(cfg: DataConfig, splits: Splits, order: TrainOrder | None, device, seed: int, augment: bool,
                 channels_last: bool):
    """The batch source of a run; `order` None for evaluation alone (train_epoch is then not available)."""
    normalise = Normalise(splits.mean, splits.std, device, channels_last, splits.image_size)
    if cfg.loader == "device":
        return DeviceBatches(splits.train, normalise, device, seed, cfg.crop_padding if augment else 0,
                             cfg.flip and augment, order)
    return LoaderBatches(cfg, splits, order, normalise, device, seed, augment)
