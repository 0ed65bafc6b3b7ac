"""Reading datasets from disk into memory, with a clear line for every missing, truncated or wrong file.

MNIST, Fashion-MNIST and CIFAR-10 go through torchvision's own classes after their files were checked
here; digits (scikit-learn, offline) and synthetic data are built in memory.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from runner.errors import UserError

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

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])


class ImageSetDataset(Dataset):
    """An ImageSet seen as a torch Dataset of (CHW uint8 tensor, label), for the DataLoader path."""

    def __init__(self, images: ImageSet):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images.images[i], int(self.images.labels[i])


# ---------------------------------------------------------------------------------------------- MNIST family

IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def check_idx(path: Path, ndim: int) -> int:
    """Check an IDX file's magic number and length before torchvision parses it; return its item count."""
    header_len = 4 + 4 * ndim
    data = path.read_bytes()
    if len(data) < header_len:
        raise DataError(f"{path} is truncated: {len(data)} bytes, shorter than its {header_len}-byte header")
    magic = int.from_bytes(data[:4], "big")
    if magic != 0x0800 | ndim:
        raise DataError(f"{path} has magic number {magic:#010x}, expected {0x0800 | ndim:#010x} "
                        f"(an IDX file of unsigned bytes with {ndim} dimensions)")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header_len + int(torch.tensor(dims).prod())
    if len(data) != expected:
        raise DataError(f"{path} is truncated or padded: {len(data)} bytes, its header {dims} needs {expected}")
    return dims[0]


def load_mnist_family(name: str, root: Path, download: bool, train: bool) -> tuple[ImageSet, Dataset]:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[name]
    raw = root / cls.__name__ / "raw"
    # torchvision wants both splits' files whichever it loads, so check all four.
    files = [raw / f for f in IDX_FILES[True] + IDX_FILES[False]]
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
    n_images, n_labels = check_idx(images_file, 3), check_idx(labels_file, 1)
    if n_images != n_labels:
        raise DataError(f"{images_file} holds {n_images} images but {labels_file} holds {n_labels} labels")
    ds = cls(str(root), train=train, download=False)
    split = ImageSet(ds.data.unsqueeze(1).contiguous(), ds.targets.long())
    check_labels(str(labels_file), split.labels, NUM_CLASSES)
    return split, ds


# ---------------------------------------------------------------------------------------------- CIFAR-10

class SafeUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only the numpy classes they need, never arbitrary code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def check_cifar_batch(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            entry = SafeUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except Exception as e:
        raise DataError(f"{path} is truncated or not a CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
        raise DataError(f"{path} is not a CIFAR-10 batch: expected a dict with 'data' and 'labels'")
    data, labels = entry["data"], entry["labels"]
    if getattr(data, "ndim", 0) != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != data.shape[0]:
        raise DataError(f"{path}: data of shape {getattr(data, 'shape', '?')} and {len(labels)} labels; "
                        f"expected N x 3072 bytes and N labels")
    if len(labels):
        check_labels(str(path), torch.tensor(labels), NUM_CLASSES)


def cifar10_class():
    from torchvision import datasets

    class CIFAR10(datasets.CIFAR10):
        """torchvision's CIFAR-10 reader without the md5 check: files are checked by check_cifar_batch."""

        meta = {**datasets.CIFAR10.meta, "md5": None}

        def _check_integrity(self) -> bool:
            base = Path(self.root) / self.base_folder
            return all((base / name).exists() for name, _ in self.train_list + self.test_list)

    return CIFAR10


def load_cifar10(root: Path, download: bool, train: bool) -> tuple[ImageSet, Dataset]:
    from torchvision import datasets

    cls = cifar10_class()
    base = root / datasets.CIFAR10.base_folder
    # torchvision wants both splits' files whichever it loads, so check them all.
    names = [n for n, _ in datasets.CIFAR10.train_list + datasets.CIFAR10.test_list]
    if download and not all((base / n).exists() for n in names):
        try:
            datasets.CIFAR10(str(root), train=train, download=True)
        except Exception as e:
            raise DataError(f"data.download=true but downloading cifar10 failed ({e}); put the python "
                            f"batches under {base}/") from None
    missing = [n for n in names + ["batches.meta"] if not (base / n).exists()]
    if missing:
        raise DataError(f"cifar10 files missing: put {', '.join(missing)} (the python version, "
                        f"cifar-10-python.tar.gz, unpacked) under {base}/, or set data.download=true")
    for n, _ in datasets.CIFAR10.train_list if train else datasets.CIFAR10.test_list:
        check_cifar_batch(base / n)
    ds = cls(str(root), train=train, download=False)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(ds.targets, dtype=torch.long)), ds


# ---------------------------------------------------------------------------------------------- in memory

def load_digits() -> tuple[ImageSet, ImageSet]:
    """scikit-learn's 1,797 real 8x8 digits, resized to MNIST's 28x28; a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    small = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False) * 255).round()
    images = images.clamp(0, 255).to(torch.uint8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = len(labels) // 5
    full = ImageSet(images, labels)
    return full.subset(order[n_test:]), full.subset(order[:n_test])


def make_synthetic(size: int, shape: list[int], classes: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """Learnable random data: each class is a fixed random pattern plus noise. Test is a fifth the size."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randint(0, 256, (classes, *shape), generator=g).float()

    def draw(n):
        labels = torch.randint(0, classes, (n,), generator=g)
        noise = torch.randn((n, *shape), generator=g) * 48
        return ImageSet((templates[labels] + noise).clamp(0, 255).to(torch.uint8), labels)

    return draw(size), draw(max(1, size // 5))


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
