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


# Image folders in every Pillow mode a folder can hold, with the 8-bit pixels an exact decode gives.

MODE_SUFFIX = {"1": "png", "L": "png", "LA": "png", "P": "png", "PA": "tif", "RGB": "png", "RGBA": "png",
               "CMYK": "tif", "I;16": "png", "I": "tif", "F": "tif"}
GREY_MODES = ("1", "L", "LA", "I;16", "I", "F")


def mode_image(mode: str, label: int, index: int, size: int = 8):
    """(a Pillow image in `mode`, the uint8 [C, H, W] an exact conversion to 8 bits gives). Class 0 is dark
    and class 1 bright, with a ramp across rows and columns, so both the level and the pattern are checked."""
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    g = ((140 if label else 10) + 10 * xx + 2 * yy + index).astype(np.uint8)  # the grey level, 10..226
    band = lambda a: Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8))  # noqa: E731
    if mode == "1":
        bits = ((xx + yy + index) % 4 == 0) != bool(label)  # class 0: 1/4 white, class 1: 3/4 white
        return Image.fromarray(bits), (bits * 255).astype(np.uint8)[None]
    if mode == "L":
        return band(g), g[None]
    if mode == "LA":
        return Image.merge("LA", [band(g), band(np.full_like(g, 255))]), g[None]
    if mode == "I;16":  # 16-bit: g * 257 is g in 8 bits; + 100 checks the rounding stays within one level
        return Image.fromarray((g.astype(np.uint16) * 257 + 100).astype(np.uint16)), g[None]
    if mode == "I":
        return Image.fromarray((g.astype(np.int32) * 257 + 100).astype(np.int32)), g[None]
    if mode == "F":  # floats in [0, 1]
        return Image.fromarray((g / 255).astype(np.float32)), g[None]
    rgb = np.stack([g, 255 - g, (40 + 20 * yy).astype(np.uint8)])
    if mode == "RGB":
        return Image.merge("RGB", [band(c) for c in rgb]), rgb
    if mode == "RGBA":
        return Image.merge("RGBA", [band(c) for c in rgb] + [band(np.full_like(g, 255))]), rgb
    if mode == "CMYK":
        return Image.merge("CMYK", [band(255 - c) for c in rgb] + [band(np.zeros_like(g))]), rgb
    if mode in ("P", "PA"):  # palette entry k is (k, 255 - k, 7k mod 256); the image holds g as indexes
        image = Image.frombytes("P", (size, size), g.tobytes())
        image.putpalette([v for k in range(256) for v in (k, 255 - k, (7 * k) % 256)])
        expected = np.stack([g, 255 - g, ((7 * g.astype(np.int64)) % 256).astype(np.uint8)])
        return (image.convert("PA") if mode == "PA" else image), expected
    raise ValueError(mode)


def write_mode_folder(root: Path, mode: str, n_train: int = 3, n_test: int = 1) -> dict[str, np.ndarray]:
    """root/{train,test}/{c0,c1}/N.<suffix> in Pillow mode `mode`. Returns {split: uint8 [N, C, H, W]} in the
    order the runner lists them (classes sorted, then file names sorted)."""
    expected = {}
    for split, n in (("train", n_train), ("test", n_test)):
        arrays = []
        for label in (0, 1):
            folder = Path(root) / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image, pixels = mode_image(mode, label, i)
                assert image.mode == mode, (image.mode, mode)
                image.save(folder / f"{i}.{MODE_SUFFIX[mode]}")
                arrays.append(pixels)
        expected[split] = np.stack(arrays)
    return expected


def add_folder_images(root: Path, name: str, n_train: int, n_test: int = 0, seed: int = 7,
                      first: int = 100) -> int:
    """Add PNG images numbered from `first` to class `name` (created if new) in train/ and test/; returns
    how many were added in all."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    label = sum(name.encode()) % 3
    for split, n in (("train", n_train), ("test", n_test)):
        folder = Path(root) / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(class_image(rng, label, SIZES[0])).save(folder / f"{first + i:03d}.png")
    return n_train + n_test
