"""What a folder of images becomes in the cache: every Pillow pixel mode scaled to the right 8 bits, odd
files (a name that is not UTF-8, a FIFO) handled in one line, a full disk in one line, and a cache edited on
disk never trusted.

The cache is read back here with the safetensors library, as the file format it is, and compared by content.
prepare_data.py runs in this process where nothing can block or crash it; as a subprocess where a hang (a
FIFO), a file size limit or a terminal's encoding is part of the case.
"""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests import sample_files
from tests.util import PYTHON, REPO, clean_env


def prepare(args: list, capsys) -> tuple[int, str, str]:
    """runner/prepare_data.py in this process: (exit code, stdout, stderr)."""
    from runner.prepare_data import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def prepare_process(args: list, tmp_path: Path, timeout: float = 120, preexec_fn=None):
    return subprocess.run([PYTHON, str(REPO / "runner" / "prepare_data.py"), *map(str, args)], cwd=REPO,
                          env=clean_env(tmp_path), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def one_error_line(code: int, stderr: str) -> str:
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr[-3000:]
    return lines[0]


def read_cache(root: Path) -> tuple[dict, dict]:
    """The folder cache under root/.cache: ({name: numpy array} from the safetensors file, its JSON)."""
    from safetensors.numpy import load_file

    tensors = sorted((root / ".cache").glob("folder-*.safetensors"))
    assert len(tensors) == 1, sorted(p.name for p in (root / ".cache").iterdir())
    return load_file(str(tensors[0])), json.loads(tensors[0].with_suffix(".json").read_text())


def write_small_folder(root: Path, classes=("c0", "c1"), n_train: int = 4, n_test: int = 2) -> Path:
    """root/{train,test}/<class>/NNN.png, 8x8 RGB; each class is a brightness level."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(rng.normal(40 + 150 * label, 10, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
    return root


# ---------------------------------------------------------------------------------------------- pixel modes

# The 8-bit modes decoded right before 16-bit and float support too; they guard the decoder, with the slow cases.
MODES = [pytest.param(m, marks=[] if m in ("I;16", "I", "F") else [pytest.mark.slow])
         for m in sample_files.MODE_SUFFIX]


@pytest.mark.parametrize("mode", MODES)
def test_every_pillow_mode_decodes_to_the_right_8_bit_pixels(tmp_path, capsys, mode):
    """A folder in each Pillow mode, built into the cache: the cached uint8 pixels are the image's content
    scaled to 8 bits (16-bit by 1/257, float [0, 1] by 255), within one level. Before, 16-bit images
    saturated to white and float ones decoded to zeros, with exit 0."""
    root = tmp_path / "modes"
    expected = sample_files.write_mode_folder(root, mode)
    channels = 1 if mode in sample_files.GREY_MODES else 3
    code, out, err = prepare(["--config", "folder", f"data.root={root}", f"data.channels={channels}",
                              "data.image_size=[8,8]"], capsys)
    assert code == 0, out + err
    tensors, header = read_cache(root)
    assert header["class_names"] == ["c0", "c1"]
    for split, want in expected.items():
        got = tensors[f"{split}.images"]
        assert got.shape == want.shape and got.dtype == np.uint8, (got.shape, got.dtype)
        difference = np.abs(got.astype(np.int64) - want.astype(np.int64))
        assert difference.max() <= 1, (f"{mode} {split}: decoded pixels differ by up to {difference.max()} "
                                       f"levels; got mean {got.mean():.1f}, expected mean {want.mean():.1f}")
        assert tensors[f"{split}.labels"].tolist() == [0] * (len(want) // 2) + [1] * (len(want) // 2)


@pytest.mark.parametrize("mode, values", [("F", [0.0, 1000.0]), ("F", [-1.0, 0.5]), ("I", [-5, 300])],
                         ids=["F-above-255", "F-negative", "I-negative"])
def test_pixels_of_an_unknown_scale_are_refused_naming_the_file_and_mode(tmp_path, capsys, mode, values):
    """A float image outside [0, 1] and [0, 255], or a 32-bit one outside 0..65535: no scale to 8 bits is
    right, so it is refused in one line naming the file and its mode (before, it decoded to clipped
    pixels without a word)."""
    from PIL import Image

    root = write_small_folder(tmp_path / "data")
    odd = root / "train" / "c1" / "odd.tif"
    ramp = np.linspace(values[0], values[1], 64).reshape(8, 8).astype(np.float32 if mode == "F" else np.int32)
    Image.fromarray(ramp).save(odd)
    assert Image.open(odd).mode == mode
    code, out, err = prepare(["--config", "folder", f"data.root={root}", "data.channels=3",
                              "data.image_size=[8,8]"], capsys)
    line = one_error_line(code, err)
    assert str(odd) in line and re.search(rf"mode {mode} pixels run from {values[0]:g} to {values[1]:g}", line), line
    assert not list(root.rglob("folder-*")), "nothing cached from a refused folder"


# ---------------------------------------------------------------------------------------------- odd files

def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
    """An image whose name is not UTF-8 is read like any other (before: a UnicodeEncodeError traceback)."""
    from PIL import Image

    root = write_small_folder(tmp_path / "data")
    name = os.fsencode(str(root / "train" / "c0")) + b"/\xff\xfe-odd.png"
    with open(name, "wb") as f:
        Image.fromarray(np.full((8, 8, 3), 40, np.uint8)).save(f, format="PNG")
    result = prepare_process(["--config", "folder", f"data.root={root}", "data.image_size=[8,8]"], tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    tensors, _ = read_cache(root)
    assert len(tensors["train.images"]) == 9, "the oddly named image is read like the others"
    assert (tensors["train.images"] == 40).all(axis=(1, 2, 3)).sum() == 1


def test_a_fifo_named_like_an_image_is_refused_without_opening_it(tmp_path):
    """train/c0/x.png is a named pipe: refused in one line naming it, promptly (before, the build blocked
    on it for ever); no cache is written."""
    root = write_small_folder(tmp_path / "data")
    os.mkfifo(root / "train" / "c0" / "x.png")
    try:
        result = prepare_process(["--config", "folder", f"data.root={root}"], tmp_path, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the cache build blocked on a FIFO named x.png")
    line = one_error_line(result.returncode, result.stderr)
    assert f"{root / 'train' / 'c0' / 'x.png'} is a named pipe (FIFO), not an image file" in line, line
    assert not list(root.rglob("folder-*")), "nothing cached from a refused folder"


def small_file_limit():
    """In the child: files may grow to 4 KiB, and writing past that fails with EFBIG (as a full disk fails
    with ENOSPC) instead of killing the process."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_a_cache_that_cannot_be_written_is_one_line(tmp_path):
    """The cache outgrows the disk (here: a file size limit): one line naming the cache and what to do, not
    a SafetensorError traceback, and no part of a file left behind."""
    root = write_small_folder(tmp_path / "data", n_train=40)
    result = prepare_process(["--config", "folder", f"data.root={root}"], tmp_path, preexec_fn=small_file_limit)
    line = one_error_line(result.returncode, result.stderr)
    assert "cannot write the folder cache" in line and "File too large" in line, line
    assert list((root / ".cache").iterdir()) == []


# ---------------------------------------------------------------------------------------------- edited caches

def fewer_images(tensors: dict, header: dict) -> None:
    tensors["train.images"], tensors["train.labels"] = tensors["train.images"][:-2], tensors["train.labels"][:-2]


def wrong_shape(tensors: dict, header: dict) -> None:
    tensors["train.images"] = np.ascontiguousarray(tensors["train.images"][:, :, :4, :])


def labels_swapped(tensors: dict, header: dict) -> None:
    tensors["train.labels"] = np.ascontiguousarray(tensors["train.labels"][::-1])


def mean_not_a_number(tensors: dict, header: dict) -> None:
    header["mean"] = ["x"] * len(header["mean"])


def class_names_of_the_wrong_length(tensors: dict, header: dict) -> None:
    header["class_names"] = header["class_names"][:1]


@pytest.mark.parametrize("damage", [fewer_images, wrong_shape, labels_swapped, mean_not_a_number,
                                    class_names_of_the_wrong_length])
def test_an_edited_cache_is_never_trusted(tmp_path, capsys, damage):
    """A cache edited under its own key (file names and the key in its metadata kept) is checked against the
    folder and itself, and built again with one line saying why: the cache on disk again holds the true
    images and decisions. Before, it was reused as it was."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    root = write_small_folder(tmp_path / "data", classes=("c0", "c1", "c2"))
    args = ["--config", "folder", f"data.root={root}"]
    assert prepare(args, capsys)[0] == 0
    true_tensors, true_header = read_cache(root)
    path = next((root / ".cache").glob("folder-*.safetensors"))
    with safe_open(str(path), "np") as f:
        metadata = f.metadata()
    tensors, header = {k: v.copy() for k, v in true_tensors.items()}, json.loads(json.dumps(true_header))
    damage(tensors, header)
    save_file(tensors, str(path), metadata=metadata)
    path.with_suffix(".json").write_text(json.dumps(header))
    code, out, err = prepare(args, capsys)
    assert code == 0, out + err
    assert "cache reused" not in out and "cache built" in out, out
    assert len([line for line in out.splitlines() if "does not match the folder" in line]) == 1, out
    tensors, header = read_cache(root)
    assert tensors.keys() == true_tensors.keys()
    for key in true_tensors:
        assert np.array_equal(tensors[key], true_tensors[key]), key
    assert header == true_header


def test_a_run_on_an_edited_cache_trains_on_the_true_classes(tmp_path, capsys, train_main):
    """class_names cut to one in the cache's JSON: training still sees the folder's three classes (before,
    it trained a model on the cache's word)."""
    root = write_small_folder(tmp_path / "data", classes=("c0", "c1", "c2"))
    assert prepare(["--config", "folder", f"data.root={root}"], capsys)[0] == 0
    header_path = next((root / ".cache").glob("folder-*.json"))
    header = json.loads(header_path.read_text())
    header["class_names"] = ["c0"]
    header_path.write_text(json.dumps(header))
    result = train_main(["--config", "folder", f"data.root={root}", "model.name=linear", "model.kwargs={}",
                         "train.epochs=1", "train.global_batch_size=4", "log.trackers=[]", "log.plot=false"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    card = json.loads((tmp_path / "runs" / "folder" / "data.json").read_text())
    assert card["class_names"] == ["c0", "c1", "c2"], card
