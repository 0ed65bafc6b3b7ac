"""Small datasets written in the real on-disk formats (MNIST IDX files, CIFAR-10 python pickles, image folders).

Tests and the benchmark use them, so that the real reading code runs without downloading anything.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0800 | ndim, big-endian dims, then the data."""
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def class_images(labels: np.ndarray, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Learnable images: a fixed random template per class plus noise."""
    templates = np.random.default_rng(1234).integers(0, 256, size=(10, *shape))
    noise = rng.normal(0, 40, size=(len(labels), *shape))
    return np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)


def write_mnist(root: Path, n_train: int = 256, n_test: int = 100, folder: str = "MNIST", seed: int = 0) -> Path:
    """Write root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (folder FashionMNIST too)."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(class_images(labels, (28, 28), rng)))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return raw


def write_cifar10(root: Path, per_batch: int = 40, n_test: int = 60, seed: int = 0) -> Path:
    """Write root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} as python pickles."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        labels = rng.integers(0, 10, size=n)
        data = class_images(labels, (3, 32, 32), rng).reshape(n, 3072)
        with open(base / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels.tolist(), "data": data,
                         "filenames": [f"{i}.png" for i in range(n)]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"], "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return base


CLASSES = ["cat", "dog", "fish"]
SIZES = [(12, 12), (12, 12), (16, 16), (10, 14)]  # most are 12x12, the rest are resized to it


def class_image(rng: np.random.Generator, label: int, size: tuple[int, int]) -> np.ndarray:
    """Noise with one colour channel raised per class: a linear model separates them."""
    image = rng.normal(60, 30, size=(*size, 3))
    image[..., label] += 120
    return np.clip(image, 0, 255).astype(np.uint8)


def write_folder(root: Path, n_train: int = 24, n_test: int = 8, seed: int = 0) -> Path:
    """root/{train,test}/<class>/: PNG and JPEG, mixed sizes, one grey image per class, and a stray text file."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = Image.fromarray(class_image(rng, label, SIZES[i % len(SIZES)]))
                if i == 5:
                    image.convert("L").save(folder / f"{i:03d}.png")
                else:
                    image.save(folder / f"{i:03d}.{'png' if i % 2 == 0 else 'jpg'}")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root
