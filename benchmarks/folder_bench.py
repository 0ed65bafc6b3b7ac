"""Benchmark: training on a folder of image files (data.name=folder).

    python -m benchmarks.folder_bench [--per-class 200] [--epochs 2] [--workers 2] [--json PATH]

Writes CIFAR-format files (tests/sample_files.py), then the same images as a PNG folder of 10 classes, and
measures:
- the cache build rate: images decoded per second by the first run (scan, headers, decode, save), and the
  seconds a later run takes to find and read the cache;
- training throughput (runner/train.py end to end, a small SimpleCNN, batch 64, img/s of the training loop) on
  the same images as an in-memory dataset (the CIFAR-10 files), as the cached folder (device path), and
  streamed from the files by DataLoader workers (data.loader=torchvision).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repo's packages
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from runner.cli import Command  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--config", "digits", "data.val_fraction=0", "model.name=simple_cnn", "model.kwargs={width: 8, hidden: 32}",
          "train.micro_batch_size=64", "train.global_batch_size=64", "data.crop_padding=0", "data.flip=false",
          "eval.every_epochs=0", "checkpoint.every_epochs=0", "log.trackers=[]", "log.plot=false", "resume=none"]


def write_png_folder(cifar_root: Path, folder: Path) -> int:
    """The CIFAR-format splits as folder/{train,test}/<class>/<i>.png; returns the image count."""
    from PIL import Image

    from runner.data.splits import DataConfig, load_splits

    splits = load_splits(DataConfig(name="cifar10", root=str(cifar_root)), seed=0)
    count = 0
    for split, images in (("train", splits.train), ("test", splits.test)):
        for i, (image, label) in enumerate(zip(images.images, images.labels.tolist())):
            path = folder / split / splits.class_names[label] / f"{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
            count += 1
    return count


def cache_rates(folder: Path, n_images: int) -> dict:
    """Seconds to build the cache (first load) and to reuse it (second load), in this process."""
    from runner.data import folder as folderlib
    from runner.data.splits import DataConfig, folder_settings

    settings = folder_settings(DataConfig(name="folder", root=str(folder)))
    started = time.perf_counter()
    folderlib.load(settings, keep_pixels=True)
    built = time.perf_counter() - started
    started = time.perf_counter()
    found = folderlib.load(settings, keep_pixels=True)
    reused = time.perf_counter() - started
    assert "cache reused" in found.description, found.description
    return {"images": n_images, "build_seconds": built, "build_images_per_s": n_images / built,
            "reuse_seconds": reused}


def train_throughput(args: list[str], workdir: Path, name: str) -> dict:
    """runner/train.py in a subprocess; its summary's training img/s and data-wait fraction."""
    from tests.util import clean_env

    command = [sys.executable, str(REPO / "runner" / "train.py"), *COMMON, *args, f"run.root={workdir / 'runs'}",
               f"run.name={name}"]
    result = subprocess.run(command, cwd=REPO, env=clean_env(workdir), capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{name}: exit code {result.returncode}: {result.stderr.strip()[-500:]}")
    throughput = json.loads((workdir / "runs" / name / "summary.json").read_text())["throughput"]
    return {"img_per_s": throughput["img_per_s"], "data_wait_fraction": throughput["data_wait_fraction"]}


def folder_benchmark(workdir: Path, per_class: int = 200, epochs: int = 2, workers: int = 2) -> dict:
    """Cache build rate and training throughput: in-memory files vs cached folder vs streamed folder."""
    from tests import sample_files

    cifar_root, folder = workdir / "cifar", workdir / "folder"
    sample_files.write_cifar10(cifar_root, per_batch=per_class * 10 // 5, n_test=per_class * 2)
    n_images = write_png_folder(cifar_root, folder)
    report = {"cache": cache_rates(folder, n_images), "train": {}}
    cases = {
        "in-memory (CIFAR-10 files)": ["data.name=cifar10", f"data.root={cifar_root}"],
        "folder, cached (device path)": ["data.name=folder", f"data.root={folder}"],
        f"folder, streamed ({workers} workers)": ["data.name=folder", f"data.root={folder}",
                                                  "data.loader=torchvision", f"data.num_workers={workers}"],
    }
    for i, (label, args) in enumerate(cases.items()):
        report["train"][label] = train_throughput(args + [f"train.epochs={epochs}"], workdir, f"case{i}")
    return report


def markdown(report: dict) -> str:
    cache = report["cache"]
    lines = [f"cache build: {cache['images']} PNG images in {cache['build_seconds']:.2f} s = "
             f"{cache['build_images_per_s']:,.0f} images/s; reuse: {cache['reuse_seconds']:.2f} s",
             "", "| data | train img/s | data wait |", "|---|---|---|"]
    for label, case in report["train"].items():
        lines.append(f"| {label} | {case['img_per_s']:,.0f} | {case['data_wait_fraction']:.0%} |")
    return "\n".join(lines)


def run(options: dict, overrides: list) -> int:
    with tempfile.TemporaryDirectory(prefix="folder_bench_") as tmp:
        report = folder_benchmark(Path(tmp), int(options.get("--per-class", 200)), int(options.get("--epochs", 2)),
                                  int(options.get("--workers", 2)))
    print(markdown(report))
    if options.get("--json"):
        Path(options["--json"]).write_text(json.dumps(report, indent=1))
    return 0


COMMAND = Command(__doc__, {"--per-class": "value", "--epochs": "value", "--workers": "value", "--json": "value"},
                  run)


def main(argv=None) -> int:
    return COMMAND.main(argv)


if __name__ == "__main__":
    sys.exit(main())
