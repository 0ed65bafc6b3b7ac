"""The folder's cache: the images decoded once into uint8 arrays (safetensors) and the decisions taken from
the data (JSON), keyed by the settings and the folder's scan, written atomically, checked against the scan
when read back, and replacing the older caches of the same folder and settings.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from runner.data.datasets import DataError
from runner.data.images import decode_image, each, probe
from runner.errors import first_line

if TYPE_CHECKING:
    from runner.data.folder_scan import FolderScan

CACHE_FORMAT = 2   # bump when decoding changes, so that older caches are not reused (2: 16-bit and float)


@dataclass(frozen=True)
class FolderSettings:
    """What reading a folder takes from the `data` section (splits.folder_settings), given by the caller.
    It lives with the cache, which is keyed by all of it and records it (source)."""
    root: str
    image_size: tuple[int, ...]  # (H, W), (S,) or () for the most common training size
    channels: int                # 1, 3, or 0: 3 if any image has colour
    skip_bad_images: bool        # skip and count corrupt files rather than stop
    cache_dir: str               # "" is <root>/.cache


@dataclass
class Decisions:
    """What was decided from the data, saved as the cache's JSON."""
    key: str
    class_names: list[str]
    channels: int
    image_size: list[int]   # [H, W]
    mean: list[float]
    std: list[float]
    counts: dict[str, int]  # images per split, bad images excluded
    skipped_files: int      # non-image files
    bad_images: list[str]   # skipped with data.skip_bad_images, relative to the root
    source: dict            # the folder and the settings asked for: a newer cache of the same source replaces this


def source(settings: FolderSettings) -> dict:
    return {"root": str(Path(settings.root).resolve()), "image_size": list(settings.image_size),
            "channels": settings.channels, "skip_bad_images": settings.skip_bad_images, "format": CACHE_FORMAT}


def cache_key(settings: FolderSettings, scan_: FolderScan) -> str:
    """The settings and every file's name, size and mtime; not the folder's path, so a copied folder
    (mtimes kept) with its cache is still cached."""
    keyed = {**source(settings), "root": None, "files": scan_.digest}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


def cache_dir(settings: FolderSettings) -> Path:
    return Path(settings.cache_dir) if settings.cache_dir else Path(settings.root) / ".cache"


def resolve_settings(settings: FolderSettings, scan_: FolderScan, bad: list) -> tuple[int, tuple[int, int]]:
    """data.channels and data.image_size, or from the data: colour if any image has it, and the most
    common training size (the larger on a tie)."""
    if settings.channels and settings.image_size:
        return settings.channels, image_size(settings.image_size)
    paths = [scan_.root / p for split in scan_.files.values() for p, _ in split]
    n_train = len(scan_.files["train"])
    found = list(each(paths, probe, settings.skip_bad_images, bad, "reading headers"))
    sizes = Counter(f[0] for f in found[:n_train] if f is not None)
    if not sizes:
        raise DataError(f"{scan_.root / 'train'}: no readable images at all")
    size = (image_size(settings.image_size) if settings.image_size
            else max(sizes, key=lambda s: (sizes[s], s[0] * s[1])))
    channels = settings.channels or (3 if any(f[1] for f in found if f is not None) else 1)
    return channels, size


def image_size(setting: tuple[int, ...]) -> tuple[int, int]:
    return (setting[0], setting[0]) if len(setting) == 1 else (setting[0], setting[1])


def build(settings: FolderSettings, scan_: FolderScan, key: str, keep_pixels: bool) -> tuple[Decisions, dict]:
    """Decode every image once: returns the decisions and, with keep_pixels, {split: (images, labels)}.
    The normalisation is exact integer sums over the training images, so it is the same whoever builds."""
    started, bad = time.perf_counter(), []
    channels, (h, w) = resolve_settings(settings, scan_, bad)
    total = sum(len(v) for v in scan_.files.values())
    print(f"folder {scan_.root}: decoding {total} images to {channels}x{h}x{w}"
          f"{f' ({scan_.skipped} non-image files skipped)' if scan_.skipped else ''}", flush=True)
    arrays, counts = {}, {}
    sums, squares, pixels = np.zeros(channels, np.int64), np.zeros(channels, np.int64), 0
    for split, entries in scan_.files.items():
        unreadable = set(bad)  # headers that failed, with data.skip_bad_images
        entries = [(scan_.root / p, label) for p, label in entries if str(scan_.root / p) not in unreadable]
        paths, labels = [p for p, _ in entries], [label for _, label in entries]
        images = np.empty((len(paths) if keep_pixels else 0, channels, h, w), np.uint8)
        kept = []
        decoded = each(paths, lambda p: decode_image(p, channels, (h, w)), settings.skip_bad_images, bad,
                       split)
        for i, image in enumerate(decoded):
            if image is None:
                continue
            if keep_pixels:
                images[len(kept)] = image
            if split == "train":
                flat = image.reshape(channels, -1).astype(np.int64)
                sums, squares, pixels = sums + flat.sum(1), squares + (flat * flat).sum(1), pixels + flat.shape[1]
            kept.append(labels[i])
        if not kept:
            raise DataError(f"{scan_.root / split}: no readable images at all")
        counts[split] = len(kept)
        if keep_pixels:
            arrays[split] = (images[:len(kept)], np.asarray(kept, np.int64))
    mean = sums / pixels / 255
    std = np.maximum(np.sqrt(np.maximum(squares / pixels / 255 ** 2 - mean ** 2, 0)), 1e-3)
    decisions = Decisions(key, scan_.class_names, channels, [h, w], mean.tolist(), std.tolist(), counts,
                          scan_.skipped, sorted(os.path.relpath(p, scan_.root) for p in bad), source(settings))
    seconds = time.perf_counter() - started
    print(f"folder {scan_.root}: decoded {total} images in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} "
          f"images/s){f'; skipped {len(bad)} bad images' if bad else ''}", flush=True)
    return decisions, arrays


def save(directory: Path, decisions: Decisions, arrays: dict) -> None:
    """Write the cache; a full disk or a folder that cannot be written to is one line, and leaves no part of
    a file behind (write_atomic)."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    stem = directory / f"folder-{decisions.key[:16]}"
    try:
        if arrays:
            tensors = {f"{split}.{part}": np.ascontiguousarray(a) for split, pair in arrays.items()
                       for part, a in zip(("images", "labels"), pair)}
            write_atomic(stem.with_suffix(".safetensors"),
                         lambda tmp: save_file(tensors, str(tmp), metadata={"key": decisions.key}))
        text = json.dumps(vars(decisions), indent=1)
        write_atomic(stem.with_suffix(".json"), lambda tmp: tmp.write_text(text))
    except (OSError, SafetensorError) as e:  # safetensors reports a failed write as its own error
        raise DataError(f"cannot write the folder cache {stem}.* ({first_line(e)}); free space there or set "
                        f"data.cache_dir to a folder with room") from None
    remove_stale(directory, decisions)


def write_atomic(path: Path, write) -> None:
    """write(tmp) then rename over `path`: a reader sees the old file, the new one or none, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{socket.gethostname()}-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # readable by the other users of a shared data folder, like the images
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale(directory: Path, current: Decisions) -> None:
    """Caches of the same folder and settings from before its files changed will not be read again."""
    for path in directory.glob("folder-*.json"):
        try:
            stale = json.loads(path.read_text())
            if stale.get("source") != current.source or stale.get("key") == current.key:
                continue
        except (OSError, ValueError, AttributeError):
            continue  # not ours to judge
        path.with_suffix(".safetensors").unlink(missing_ok=True)
        path.unlink(missing_ok=True)


class BadCache(Exception):
    """A cache file that is there but does not hold what it claims (edited, or written by other code)."""


def read_cache(stem: Path, settings: FolderSettings, scan_: FolderScan, key: str,
               keep_pixels: bool) -> tuple[Decisions, dict | None] | None:
    """The cache of this key as (decisions, {split: (images, labels)} with keep_pixels), everything in it
    checked against the folder's scan; None to build it again, with one line when a cache was there but
    wrong. A cache decides what a run trains on (class names, labels, normalisation): it is never trusted."""
    if not stem.with_suffix(".json").exists() or (keep_pixels and not stem.with_suffix(".safetensors").exists()):
        return None
    try:
        try:
            decisions = Decisions(**json.loads(stem.with_suffix(".json").read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise BadCache(f"its JSON is unreadable: {first_line(e)}") from None
        labels = expected_labels(decisions, settings, scan_, key)
        pixels = read_pixels(stem.with_suffix(".safetensors"), key, decisions, labels) if keep_pixels else None
    except BadCache as e:
        print(f"folder cache {stem}.* does not match the folder ({e}); building it again", flush=True)
        return None
    return decisions, pixels


def expected_labels(d: Decisions, settings: FolderSettings, scan_: FolderScan, key: str) -> dict:
    """Check the cached decisions against the settings and the scan; returns {split: the labels its images
    must have}. Raises BadCache."""
    def number_list(values, n: int) -> bool:
        return (isinstance(values, list) and len(values) == n and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values))

    if d.key != key or d.source != source(settings):
        raise BadCache("its key or source is not this folder's")
    if d.class_names != scan_.class_names:
        raise BadCache(f"class names {d.class_names!r:.80}, the folder has {len(scan_.class_names)} classes")
    if d.channels not in (1, 3) or settings.channels not in (0, d.channels):
        raise BadCache(f"channels {d.channels!r}")
    if not (number_list(d.image_size, 2) and all(isinstance(v, int) and v > 0 for v in d.image_size)
            and (not settings.image_size or tuple(d.image_size) == image_size(settings.image_size))):
        raise BadCache(f"image size {d.image_size!r:.40}")
    if not (number_list(d.mean, d.channels) and number_list(d.std, d.channels) and min(d.std) > 0):
        raise BadCache(f"mean {d.mean!r:.40} and std {d.std!r:.40} are not {d.channels} numbers each")
    scanned = {p for entries in scan_.files.values() for p, _ in entries}
    if not (isinstance(d.bad_images, list) and set(d.bad_images) <= scanned and d.skipped_files == scan_.skipped):
        raise BadCache("its skipped and bad files are not the folder's")
    bad = set(d.bad_images)
    labels = {split: [label for p, label in entries if p not in bad] for split, entries in scan_.files.items()}
    if d.counts != {split: len(kept) for split, kept in labels.items()}:
        raise BadCache(f"image counts {d.counts!r:.80}")
    return labels


def read_pixels(path: Path, key: str, d: Decisions, labels: dict) -> dict:
    """{split: (uint8 images [N, C, H, W], int64 labels [N])}, checked against the decisions and the labels
    the scan gives. Raises BadCache."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                raise BadCache("its pixels are of another key")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except BadCache:
        raise
    except Exception as e:  # safetensors has its own error types
        raise BadCache(f"its pixels are unreadable: {first_line(e)}") from None
    if set(tensors) != {f"{split}.{part}" for split in labels for part in ("images", "labels")}:
        raise BadCache(f"it holds {', '.join(sorted(tensors))}")
    pixels = {}
    for split, want in labels.items():
        images, found = tensors[f"{split}.images"], tensors[f"{split}.labels"]
        if images.dtype != torch.uint8 or tuple(images.shape) != (len(want), d.channels, *d.image_size):
            raise BadCache(f"{split} images of shape {tuple(images.shape)} and type {images.dtype}")
        if found.dtype != torch.int64 or found.tolist() != want:
            raise BadCache(f"{split} labels are not the folder's")
        pixels[split] = (images, found)
    return pixels
