"""A folder of the user's own images as a dataset: DIR/train/<class>/*, DIR/test/<class>/*, and
DIR/val/<class>/* when present. Class names are the train folder's subfolder names, sorted.

Every run scans the folder (folder_scan.py: names, sizes and mtimes only). Together with the decode settings they key a
cache in data.cache_dir: the images decoded once into uint8 arrays (safetensors) and a JSON file with what
was decided from the data (classes, image size, channels, normalisation, skipped files). A later run with
the same files and settings reads the cache instead of decoding; any added, removed or touched file builds
a new one, which replaces the old. The cache is never unpickled, each file is written to a temporary
name and renamed, and everything read from it is checked against the scan before it is used (folder_cache.py).

For folders larger than memory (data.loader=torchvision) only the JSON is cached and DataLoader workers
decode files on access (FolderImages). Both paths decode with decode_image (images.py), so they see the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from runner.data.datasets import ImageSet
from runner.data.folder_cache import Decisions, FolderSettings, build, cache_dir, cache_key, read_cache, save
from runner.data.folder_scan import FolderScan, scan
from runner.data.images import decode_image


@dataclass
class FolderData:
    splits: dict[str, ImageSet]  # train, test and val when DIR/val exists
    decisions: Decisions
    description: str             # for the run's header


def load(settings: FolderSettings, keep_pixels: bool, found: FolderScan | None = None) -> FolderData:
    """The folder's splits: in memory from the cache (built now if missing), or, without keep_pixels
    (data.loader=torchvision), decoded lazily from the files. `found`: the folder's scan, if taken already
    (for the run's data identity)."""
    found = found or scan(Path(settings.root))
    key = cache_key(settings, found)
    stem = cache_dir(settings) / f"folder-{key[:16]}"
    cached = read_cache(stem, settings, found, key, keep_pixels)
    reused = cached is not None
    if cached is not None:
        decisions, pixels = cached
    else:
        decisions, arrays = build(settings, found, key, keep_pixels)
        save(stem.parent, decisions, arrays)
        pixels = {split: tuple(torch.from_numpy(a) for a in pair) for split, pair in arrays.items()}
    if keep_pixels:
        splits = {split: ImageSet(*pair) for split, pair in pixels.items()}
    else:
        splits = lazy_splits(found, decisions)
    d = decisions
    description = (f"folder {found.root}: {len(d.class_names)} classes, {d.channels}x{d.image_size[0]}x"
                   f"{d.image_size[1]}, {d.skipped_files} non-image files skipped"
                   f"{f', {len(d.bad_images)} bad images skipped' if d.bad_images else ''}, cache "
                   f"{'reused' if reused else 'built'} ({stem}.*)")
    return FolderData(splits, decisions, description)


def lazy_splits(found: FolderScan, decisions: Decisions) -> dict[str, ImageSet]:
    bad = set(decisions.bad_images)
    splits = {}
    for split, entries in found.files.items():
        kept = [(p, label) for p, label in entries if p not in bad]
        images = FolderImages([str(found.root / p) for p, _ in kept], decisions.channels,
                              tuple(decisions.image_size))
        splits[split] = ImageSet(images, torch.tensor([label for _, label in kept], dtype=torch.long))
    return splits


class FolderImages:
    """A split's image files, decoded on access. It stands in for an ImageSet's uint8 [N, C, H, W] tensor
    where the DataLoader path uses one: len, shape, an int index (one decoded image) and an index tensor
    (a subset, still lazy)."""

    def __init__(self, paths: list[str], channels: int, size: tuple[int, int]):
        self.paths, self.channels, self.size = paths, channels, size

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), self.channels, *self.size))

    def __getitem__(self, index):
        if isinstance(index, torch.Tensor) and index.ndim == 1:
            return FolderImages([self.paths[i] for i in index.tolist()], self.channels, self.size)
        return torch.from_numpy(decode_image(self.paths[int(index)], self.channels, self.size))
