"""Image files decoded to pixels: every Pillow mode to 8 bits, converted to grey or RGB and resized, the
same way for the folder cache, lazy loading and prediction; an image's size and colour from its header; and
many files at once on a few threads.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image, ImageOps

from runner.data.datasets import DataError
from runner.errors import first_line

COLOUR_MODES = {"RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA"}
BLOCK = 1024      # files decoded per batch of thread-pool work


def image_suffixes() -> set[str]:
    """File extensions Pillow can decode; other files in the folder are skipped and counted."""
    return {suffix.lower() for suffix in Image.registered_extensions()}


def escaped(path) -> str:
    """A path for a message: bytes of a name that is not UTF-8 shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


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
