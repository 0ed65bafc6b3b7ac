"""The identity of a run's data: part of its fingerprint, so that other data is another experiment.

- folder: the digest of the file list that keys its cache (every image's path, size and mtime, and the
  class folders; the decode settings are config keys of the fingerprint already) and the class names with
  their image counts, from one scan of the folder (no image is opened). The scan is kept and handed to the loader, so that what is fingerprinted is what is loaded.
- mnist, fashion_mnist, cifar10: each file's size and a sha256 of its first and last MiB plus its size;
  cheap to compute on every start, and it sees any rewrite of a header, the first or the last images.
- digits, synthetic: None; their config keys already define them.

Files that data.download=true is about to fetch have no identity yet: it is taken again once they are there.
This module imports no torch: rundir.py describes a changed identity with it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import clip

if TYPE_CHECKING:
    from runner.data.folder_scan import FolderScan
    from runner.data.splits import DataConfig

KEY = "data.identity"  # its key in a run's fingerprint
DIGEST_SPAN = 1 << 20  # a file's first and last MiB are hashed


@dataclass
class DataIdentity:
    value: Any                        # what the fingerprint holds (JSON: it is stored in data.json)
    scan: FolderScan | None = None    # a folder's listing, for the loader
    pending: bool = False             # files still to be downloaded: take the identity again after loading


def data_identity(cfg: DataConfig) -> DataIdentity:
    if cfg.name == "folder":
        from runner.data import folder_scan

        found = folder_scan.scan(Path(cfg.root))
        return DataIdentity(folder_scan.identity(found), found)
    if cfg.name in ("mnist", "fashion_mnist", "cifar10"):
        from runner.data.datasets import dataset_files
        from runner.yaml_files import not_a_regular_file

        root = Path(cfg.root)
        files = dataset_files(cfg.name, root)
        try:
            if not any(not_a_regular_file(f) for f in files):  # a FIFO would block: loading refuses it
                return DataIdentity({"files": {f.relative_to(root).as_posix(): file_digest(f) for f in files}})
        except OSError:
            pass  # missing or unreadable: downloaded, or refused in one line, when loading
        return DataIdentity(None, pending=True)
    return DataIdentity(None)


def file_digest(path: Path) -> str:
    """`SIZE sha256:HEX` of the file's size and its first and last MiB (all of it when smaller)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(DIGEST_SPAN))
        if size > DIGEST_SPAN:
            f.seek(max(DIGEST_SPAN, size - DIGEST_SPAN))
            h.update(f.read(DIGEST_SPAN))
    return f"{size} sha256:{h.hexdigest()[:32]}"


def describe_change(saved, now) -> str:
    """What differs between two identities, in words: "8 images added, class bird added"."""
    if not (isinstance(saved, dict) and isinstance(now, dict)):
        return ("none recorded (a run from before the data was part of the fingerprint)" if saved is None
                else "the files are not there yet")
    if "classes" in saved and "classes" in now:
        return folder_change(saved["classes"], now["classes"])
    if "files" in saved and "files" in now:
        old, new = saved["files"], now["files"]
        parts = ([f"{name} changed" for name in sorted(set(old) & set(new)) if old[name] != new[name]]
                 + [f"{name} added" for name in sorted(set(new) - set(old))]
                 + [f"{name} removed" for name in sorted(set(old) - set(new))])
        return ", ".join(parts) or "the same files"
    return "another kind of data"


def folder_change(old: dict, new: dict) -> str:
    """Images added and removed (counted per class), classes added and removed."""
    added = sum(max(0, n - old.get(name, 0)) for name, n in new.items())
    removed = sum(max(0, n - new.get(name, 0)) for name, n in old.items())
    parts = [f"{added} image{'s' * (added != 1)} added"] if added else []
    parts += [f"{removed} image{'s' * (removed != 1)} removed"] if removed else []
    parts += [f"class {clip(name)} added" for name in sorted(set(new) - set(old))]  # any folder name, printable
    parts += [f"class {clip(name)} removed" for name in sorted(set(old) - set(new))]
    return ", ".join(parts) or "images replaced or touched (the same classes and counts; other names, sizes or mtimes)"
