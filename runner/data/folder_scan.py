"""Scanning an image folder: its class folders and image files, with names, sizes and mtimes only (no image
is opened), and the digest of that listing that keys the cache and identifies the data.
"""
from __future__ import annotations

import hashlib
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from runner.data.datasets import DataError
from runner.data.images import escaped, image_suffixes
from runner.yaml_files import not_a_regular_file

SPLITS = ("train", "val", "test")
LAYOUT = "expected DIR/train/<class>/* and DIR/test/<class>/* (and optionally DIR/val/<class>/*)"


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


def identity(scan_: FolderScan) -> dict:
    """The folder's part of the run's fingerprint (runner/data/identity.py): the digest of its file list (the
    cache key's; the settings are config keys), and the class names with their image counts (all splits),
    from which a change is described."""
    counts = Counter(label for entries in scan_.files.values() for _, label in entries)
    return {"digest": scan_.digest,
            "classes": {name: counts[label] for label, name in enumerate(scan_.class_names)}}
