"""Reading datasets from disk into memory, with a clear line for every missing, truncated or wrong file.

MNIST, Fashion-MNIST (IDX files) and CIFAR-10 (pickles, through a restricted unpickler) are read here, so
that what is checked is what is loaded and no data file can run code; torchvision only downloads them.
Digits (scikit-learn, offline) and synthetic data are built in memory.
"""
from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from runner.errors import UserError, clip
from runner.yaml_files import not_a_regular_file

NUM_CLASSES = 10
# Per-channel mean/std of the training images; digits and synthetic compute theirs at load time.
NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


class DataError(UserError):
    pass


@dataclass(eq=False)
class ImageSet:
    """A decoded split: uint8 images [N, C, H, W] and int64 labels [N]."""
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str] | None = None  # as the dataset's own files name them (CIFAR-10's batches.meta)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.class_names)


class ImageSetDataset(Dataset):
    """An ImageSet seen as a torch Dataset of (CHW uint8 tensor, label), for the DataLoader path."""

    def __init__(self, images: ImageSet):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images.images[i], int(self.images.labels[i])


# ---------------------------------------------------------------------------------------------- files

def read_data_file(path: Path, what: str, *, head: int | None = None, size: int | None = None,
                   max_size: int | None = None) -> bytes:
    """A data file's bytes (its first `head` only, if given), or one line: a directory, a device or FIFO
    (reading would block or never end), an unreadable file, or one whose length is not `size` or is above
    `max_size` (checked before reading, so that a huge or sparse file is not pulled into memory)."""
    try:
        kind = not_a_regular_file(path)
        if kind:
            raise DataError(f"{path} is {kind}, not {what}")
        actual = path.stat().st_size
        if size is not None and actual != size:
            raise DataError(f"{path} is truncated or padded: {actual} bytes, its header needs {size}")
        if max_size is not None and actual > max_size:
            raise DataError(f"{path} is {actual:,} bytes, more than {what} can be ({max_size:,} at most)")
        with open(path, "rb") as f:
            return f.read() if head is None else f.read(head)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


# ---------------------------------------------------------------------------------------------- MNIST family

IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # torchvision's class names


def dataset_files(name: str, root: Path) -> list[Path]:
    """The files a built-in dataset (mnist, fashion_mnist, cifar10) is read from."""
    if name == "cifar10":
        return [root / CIFAR_FOLDER / n for n in CIFAR_BATCHES[True] + CIFAR_BATCHES[False] + [CIFAR_META]]
    return [root / MNIST_FOLDERS[name] / "raw" / f for f in IDX_FILES[True] + IDX_FILES[False]]


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An IDX file of unsigned bytes as a uint8 tensor of the shape its header declares, after checking the
    magic number, that no dimension is 0 and that the length matches."""
    header_len, what = 4 + 4 * ndim, f"an IDX file of {'images' if ndim == 3 else 'labels'}"
    header = read_data_file(path, what, head=header_len)
    if len(header) < header_len:
        raise DataError(f"{path} is truncated: {len(header)} bytes, shorter than its {header_len}-byte header")
    magic = int.from_bytes(header[:4], "big")
    if magic != 0x0800 | ndim:
        raise DataError(f"{path} has magic number {magic:#010x}, expected {0x0800 | ndim:#010x} "
                        f"(an IDX file of unsigned bytes with {ndim} dimensions)")
    dims = [int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if 0 in dims:
        raise DataError(f"{path}: its header declares shape {dims}; a dimension of 0 holds no data")
    expected = header_len + math.prod(dims)
    data = read_data_file(path, what, size=expected)
    if len(data) != expected:  # changed since its size was checked
        raise DataError(f"{path} is truncated or padded: {len(data)} bytes, its header {dims} needs {expected}")
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=header_len).reshape(dims).copy())


def load_mnist_family(name: str, root: Path, download: bool, train: bool) -> tuple[ImageSet, Dataset]:
    """Read the IDX files here, not through torchvision, which would prefer a `processed/*.pt` found beside
    them to the files checked here."""
    from torchvision import datasets

    cls = getattr(datasets, MNIST_FOLDERS[name])
    raw = root / MNIST_FOLDERS[name] / "raw"
    files = dataset_files(name, root)
    if download and not all(f.exists() for f in files):
        try:
            cls(str(root), train=train, download=True)
        except Exception as e:  # network errors come in many types
            raise DataError(f"data.download=true but downloading {name} failed ({e}); "
                            f"put {', '.join(IDX_FILES[train])} under {raw}/") from None
    missing = [f.name for f in files if not f.exists()]
    if missing:
        gz = [m for m in missing if (raw / f"{m}.gz").exists()]
        hint = f" (found {', '.join(m + '.gz' for m in gz)}: gunzip them)" if gz else ""
        raise DataError(f"{name} files missing: put {', '.join(missing)} under {raw}/{hint}, "
                        f"or set data.download=true on a machine with internet")
    images_file, labels_file = [raw / f for f in IDX_FILES[train]]
    images, labels = read_idx(images_file, 3), read_idx(labels_file, 1)
    if len(images) != len(labels):
        raise DataError(f"{images_file} holds {len(images)} images but {labels_file} holds {len(labels)} labels")
    split = ImageSet(images.unsqueeze(1), labels.long())
    check_labels(str(labels_file), split.labels, NUM_CLASSES)
    return split, ImageSetDataset(split)


# ---------------------------------------------------------------------------------------------- CIFAR-10

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_BATCHES = {True: [f"data_batch_{i}" for i in range(1, 6)], False: ["test_batch"]}
CIFAR_META = "batches.meta"
MAX_CIFAR_FILE = 256 << 20  # a batch of 10,000 images is 31 MB; a larger "batch" is not one


class SafeUnpickler(pickle.Unpickler):
    """CIFAR files are pickles, which can run any code on load: allow only the numpy classes their arrays
    need. Every pickle the project reads goes through here."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise RefusedClass(f"{module}.{name}")


class RefusedClass(pickle.UnpicklingError):
    pass


def unpickle(path: Path, what: str):
    data = read_data_file(path, what, max_size=MAX_CIFAR_FILE)
    try:
        return SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except RefusedClass as e:
        raise DataError(f"{path} is not {what}: it asks to load {clip(str(e))}, which a data file never "
                        f"needs; refused, nothing was run") from None
    except Exception as e:  # a damaged pickle fails in many ways (EOFError, KeyError, MemoryError, ...)
        raise DataError(f"{path} is truncated or not {what} ({reason(e)})") from None


def reason(error: BaseException) -> str:
    """An exception as `Type: its first line`, cut short for an error line."""
    text = str(error).strip()
    return f"{type(error).__name__}: {clip(text.splitlines()[0]) if text else ''}"


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python-version CIFAR-10 batch: (uint8 data N x 3072, int labels N), checked."""
    entry = unpickle(path, "a CIFAR-10 batch")
    if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
        raise DataError(f"{path} is not a CIFAR-10 batch: expected a dict with 'data' and 'labels'")
    data, labels = entry["data"], integer_array(entry["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' is {describe(data)}; expected N x 3072 unsigned bytes")
    if labels is None or len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images, but 'labels' is {describe(entry['labels'])}; expected "
                        f"{len(data)} integers")
    check_labels(str(path), torch.from_numpy(labels), NUM_CLASSES)
    return data, labels


def integer_array(values) -> np.ndarray | None:
    """`values` as a 1-d int64 array, or None if it is not a flat list of integers."""
    if not isinstance(values, (list, np.ndarray)):
        return None
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, OverflowError):  # ragged or nested lists
        return None
    if array.ndim == 1 and array.size == 0:
        return np.zeros(0, np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu" or array.max() >= 2 ** 63:
        return None
    return array.astype(np.int64)


def describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype} with shape {value.shape}"
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def read_cifar_meta(path: Path) -> list[str]:
    """batches.meta: the 10 class names, in label order."""
    meta = unpickle(path, "CIFAR-10's batches.meta")
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == NUM_CLASSES and all(isinstance(n, str) for n in names)):
        raise DataError(f"{path} is not CIFAR-10's batches.meta: expected 'label_names', a list of "
                        f"{NUM_CLASSES} class names")
    return names


def read_cifar10(root: Path, train: bool) -> ImageSet:
    base = root / CIFAR_FOLDER
    class_names = read_cifar_meta(base / CIFAR_META)
    batches = [read_cifar_batch(base / name) for name in CIFAR_BATCHES[train]]
    images = torch.from_numpy(np.concatenate([data for data, _ in batches])).reshape(-1, 3, 32, 32)
    labels = torch.from_numpy(np.concatenate([labels for _, labels in batches]).astype(np.int64))
    return ImageSet(images, labels, class_names)


def load_cifar10(root: Path, download: bool, train: bool) -> tuple[ImageSet, Dataset]:
    """The python version of CIFAR-10, read here through SafeUnpickler: torchvision's reader would unpickle
    the batches and batches.meta with plain pickle.load, which runs whatever code a crafted file holds."""
    base = root / CIFAR_FOLDER
    if download and not all(f.exists() for f in dataset_files("cifar10", root)):
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        except Exception as e:
            raise DataError(f"data.download=true but downloading cifar10 failed ({e}); put the python "
                            f"batches under {base}/") from None
    missing = [f.name for f in dataset_files("cifar10", root) if not f.exists()]
    if missing:
        raise DataError(f"cifar10 files missing: put {', '.join(missing)} (the python version, "
                        f"cifar-10-python.tar.gz, unpacked) under {base}/, or set data.download=true")
    split = read_cifar10(root, train)
    return split, ImageSetDataset(split)


def cifar10_class():
    """torchvision's CIFAR10 (PIL images and transforms, as in its tutorial) with its files read by
    read_cifar10, for the benchmark's tutorial baseline."""
    from torchvision import datasets

    class CIFAR10(datasets.CIFAR10):
        def __init__(self, root, train: bool = True, transform=None, target_transform=None):
            datasets.VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
            split = read_cifar10(Path(root), train)
            self.train, self.classes = train, split.class_names
            self.data = split.images.permute(0, 2, 3, 1).numpy()  # HWC, as torchvision keeps it
            self.targets = split.labels.tolist()
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    return CIFAR10


# ---------------------------------------------------------------------------------------------- in memory

def sklearn_digits_table():
    """The rows of scikit-learn's digits.csv.gz (64 pixels, then the label), read from the file it ships:
    importing scikit-learn itself takes about two seconds of every run's start-up."""
    import gzip
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.name=digits needs scikit-learn, which ships the digits (pip install scikit-learn)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.int64)


def load_digits() -> tuple[ImageSet, ImageSet]:
    """scikit-learn's 1,797 real 8x8 digits, resized to MNIST's 28x28; a fixed 80/20 train/test split."""
    table = sklearn_digits_table()
    small = torch.tensor(table[:, :64], dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    images = (F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False) * 255).round()
    images = images.clamp(0, 255).to(torch.uint8)
    labels = torch.tensor(table[:, 64], dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = len(labels) // 5
    full = ImageSet(images, labels)
    return full.subset(order[n_test:]), full.subset(order[:n_test])


def make_synthetic(size: int, shape: list[int], classes: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """Learnable random data: each class is a fixed random pattern plus noise. Test is a fifth the size."""
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        labels = torch.randint(0, classes, (n,), generator=g)
        noise = torch.randn((n, *shape), generator=g) * 48
        return ImageSet((templates[labels] + noise).clamp(0, 255).to(torch.uint8), labels)

    try:
        templates = torch.randint(0, 256, (classes, *shape), generator=g).float()
        return draw(size), draw(max(1, size // 5))
    except (MemoryError, RuntimeError) as e:  # torch reports a failed allocation as a RuntimeError
        raise DataError(f"data.synthetic_size={size} images of data.synthetic_shape={shape} in "
                        f"data.synthetic_classes={classes} classes do not fit in memory ({reason(e)})") from None


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div(255).transpose(0, 1).flatten(1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-3).tolist())


def check_labels(source: str, labels: torch.Tensor, num_classes: int) -> None:
    if len(labels) == 0:
        raise DataError(f"{source} is empty")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(f"{source}: labels run from {low} to {high}, outside the {num_classes} classes "
                        f"0..{num_classes - 1}")
