"""A folder of the user's own images as a dataset: DIR/train/<class>/*, DIR/test/<class>/*, and
DIR/val/<class>/* when present. Class names are the train folder's subfolder names, sorted.

Every run scans the folder (names, sizes and mtimes only). Together with the decode settings they key a
cache in data.cache_dir: the images decoded once into uint8 arrays (safetensors) and a JSON file with what
was decided from the data (classes, image size, channels, normalisation, skipped files). A later run with
the same files and settings reads the cache instead of decoding; any added, removed or touched file builds
a new one, which replaces the old. The cache is never unpickled, each file is written to a temporary
name and renamed, and everything read from it is checked against the scan before it is used (read_cache).

For folders larger than memory (data.loader=torchvision) only the JSON is cached and DataLoader workers
decode files on access (FolderImages). Both paths decode with decode_image, so they see the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import stat
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from runner.data.datasets import DataError, ImageSet
from runner.errors import first_line
from runner.yaml_files import not_a_regular_file

CACHE_FORMAT = 2   # bump when decoding changes, so that older caches are not reused (2: 16-bit and float)
SPLITS = ("train", "val", "test")
COLOUR_MODES = {"RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA"}
BLOCK = 1024      # files decoded per batch of thread-pool work
LAYOUT = "expected DIR/train/<class>/* and DIR/test/<class>/* (and optionally DIR/val/<class>/*)"


@dataclass(frozen=True)
class FolderSettings:
    """What reading a folder takes from the `data` section (splits.folder_settings), given by the caller."""
    root: str
    image_size: tuple[int, ...]  # (H, W), (S,) or () for the most common training size
    channels: int                # 1, 3, or 0: 3 if any image has colour
    skip_bad_images: bool        # skip and count corrupt files rather than stop
    cache_dir: str               # "" is <root>/.cache


def image_suffixes() -> set[str]:
    """File extensions Pillow can decode; other files in the folder are skipped and counted."""
    return {suffix.lower() for suffix in Image.registered_extensions()}


# ---------------------------------------------------------------------------------------------- scanning

@dataclass
class FolderScan:
    root: Path
    class_names: list[str]
    files: dict[str, list[tuple[str, int]]]  # split -> [(path relative to root, label)], sorted
    skipped: int                             # non-image files
    digest: str                              # sha256 of every file's name, label, size and mtime


def list_class(root: Path, folder: Path, suffixes: set[str], rows: list[str]) -> tuple[list[str], int]:
    """Image files under one class folder (recursively, hidden names skipped), relative to root, and the
    count of other files; appends each image's `path size mtime` to rows for the cache key."""
    images, others = [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() not in suffixes:
                others += 1
                continue
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end when decoded
                raise DataError(f"{escaped(path)} is {not_a_regular_file(Path(path))}, not an image file; "
                                f"remove it from the folder")
            images.append(os.path.relpath(path, root))
            rows.append(f"{images[-1]}\t{st.st_size}\t{st.st_mtime_ns}")
    return images, others


def escaped(path) -> str:
    """A path for a message: bytes of a name that is not UTF-8 shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan(root: Path) -> FolderScan:
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist or is not a folder; {LAYOUT}")
    for required in ("train", "test"):
        if not (root / required).is_dir():
            raise DataError(f"{root / required} does not exist: data.name=folder {LAYOUT}")
    class_names = subfolders(root / "train")
    if not class_names:
        raise DataError(f"{root / 'train'} has no class folders, so no images at all: put each class's "
                        f"images in {root / 'train'}/<class>/")
    label = {name: i for i, name in enumerate(class_names)}
    suffixes, rows, skipped, files = image_suffixes(), [], 0, {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        skipped += sum(1 for p in split_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        entries = []
        for name in subfolders(split_dir):
            if name not in label:
                raise DataError(f"{split_dir / name}: class {name!r} is not in {root / 'train'} "
                                f"(its classes: {', '.join(class_names)})")
            rows.append(f"{split}/{name}\t{label[name]}")
            images, others = list_class(root, split_dir / name, suffixes, rows)
            if not images:
                raise DataError(f"{split_dir / name} is an empty class folder: no image files "
                                f"({others} other files)")
            entries += [(p, label[name]) for p in images]
            skipped += others
        if not entries:
            raise DataError(f"{split_dir} has no class folders, so no images: put them in {split_dir}/<class>/")
        files[split] = entries
    digest = hashlib.sha256("\n".join(rows).encode("utf-8", "surrogateescape")).hexdigest()  # any file name
    return FolderScan(root, class_names, files, skipped, digest)


# ---------------------------------------------------------------------------------------------- decoding

def open_error(path, e: Exception) -> DataError:
    return DataError(f"{escaped(path)} is corrupt, truncated or not an image ({first_line(e)})")


def to_8_bits(im: Image.Image, path) -> Image.Image:
    """A 16-bit or 32-bit greyscale image as 8-bit "L", scaled rather than clipped (Pillow's own conversion
    clips, so that 16-bit images come out nearly white and float ones black). I;16: v / 257. I (32-bit
    integers): as is if every value is in 0..255, else v / 257 if in 0..65535, else refused. F (floats):
    v * 255 if every value is in [0, 1], as is if in [0, 255], else refused. Decided per image."""
    values = np.asarray(im, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and 255 < high and low >= 0 and high <= 65535):
        values = values / 257
    elif im.mode == "F" and low >= 0 and high <= 1:
        values = values * 255
    elif not (low >= 0 and high <= 255):  # also NaN, which compares false
        limit = "0..65535" if im.mode == "I" else "[0, 1] or [0, 255]"
        raise DataError(f"{escaped(path)}: mode {im.mode} pixels run from {low:g} to {high:g}, outside {limit}, "
                        f"so their scale to 8 bits is unknown; convert the images to 8 or 16 bits")
    return Image.fromarray(np.round(values).astype(np.uint8), "L")


def decode_image(path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One image file as uint8 [C, H, W]: EXIF rotation applied, 16-bit and float images scaled to 8 bits
    (to_8_bits), converted to grey (1) or RGB (3), resized (bilinear) to size = (H, W). Training,
    streaming and prediction all go through here."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("P", "PA"):  # palettes with transparency convert cleanly only through RGBA
                im = im.convert("RGBA")
            elif im.mode.startswith("I") or im.mode == "F":
                im = to_8_bits(im, path)
            im = im.convert("RGB" if channels == 3 else "L")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            pixels = np.array(im)  # a writable copy, as torch.from_numpy wants
    except DataError:
        raise
    except Exception as e:  # Pillow reports bad files as OSError, SyntaxError, ValueError, ...
        raise open_error(path, e) from None
    return pixels[None] if channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def probe(path) -> tuple[tuple[int, int], bool]:
    """(H, W) after EXIF rotation and whether the image has colour, from its header only."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
            colour = im.mode in COLOUR_MODES
            if im.mode == "P":  # a palette image is colour unless its palette is grey
                palette = np.asarray(im.getpalette() or [], dtype=np.int64).reshape(-1, 3)
                colour = bool((palette != palette[:, :1]).any())
    except Exception as e:
        raise open_error(path, e) from None
    return (h, w), colour


def each(paths: list, work, skip_bad: bool, bad: list[str], desc: str):
    """work(path) for every path in order, on a few threads (Pillow decodes without the GIL), with a
    progress bar on a terminal. A bad file raises, or is appended to `bad` and yields None."""
    from concurrent.futures import ThreadPoolExecutor

    def attempt(path):
        try:
            return work(path)
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{e}; remove or replace it, or set data.skip_bad_images=true to skip such "
                                f"files") from None
            bad.append(str(path))
            return None

    bar = None
    if sys.stdout.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(paths), unit="img", desc=desc, file=sys.stdout, leave=False)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for begin in range(0, len(paths), BLOCK):  # a block at a time: a future per file would not fit
            for result in pool.map(attempt, paths[begin:begin + BLOCK]):
                yield result
            if bar is not None:
                bar.update(len(paths[begin:begin + BLOCK]))
    if bar is not None:
        bar.close()


# ---------------------------------------------------------------------------------------------- the cache

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


def identity(scan_: FolderScan) -> dict:
    """The folder's part of the run's fingerprint (runner/data/identity.py): the digest of its file list (the
    cache key's; the settings are config keys), and the class names with their image counts (all splits),
    from which a change is described."""
    counts = Counter(label for entries in scan_.files.values() for _, label in entries)
    return {"digest": scan_.digest,
            "classes": {name: counts[label] for label, name in enumerate(scan_.class_names)}}


def cache_dir(settings: FolderSettings) -> Path:
    return Path(settings.cache_dir) if settings.cache_dir else Path(settings.root) / ".cache"


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


# ---------------------------------------------------------------------------------------------- loading

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
