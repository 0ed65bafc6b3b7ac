"""Transfer learning, measured end to end through the runner's command line.

    python -m benchmarks.transfer [--workdir DIR] [--model timm:resnet18] [--per-class 10] [--epochs 15]

scikit-learn's digits are written as PNG folders: digits 0-4 (all of them) to pretrain on, and digits 5-9
with --per-class training images each (the rest of 5-9 is the test set) to fine-tune on. The same model then
trains on 5-9 twice for the same epochs, once from the 0-4 run's best checkpoint (model.weights=<run>: the
head is re-initialised for the new classes) and once from scratch. Prints the test accuracy and wall time
of each run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Digits are 8x8 grey: upscaled to 32x32, no flips (a flipped digit is another glyph).
COMMON = ["--config", "finetune", "data.channels=1", "data.image_size=32", "data.flip=false", "log.trackers=[]",
          "log.plot=false", "log.progress=lines", "train.global_batch_size=32", "schedule.warmup_steps=5"]


def write_digits(root: Path, per_class: int) -> tuple[Path, Path]:
    """(pretrain folder with digits 0-4, fine-tune folder with digits 5-9), each with train/ and test/."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    rng = np.random.default_rng(0)
    source, target = root / "digits_0-4", root / "digits_5-9"
    for label in range(10):
        index = rng.permutation(np.flatnonzero(digits.target == label))
        folder, n_train = (source, len(index) * 4 // 5) if label < 5 else (target, per_class)
        for split, part in (("train", index[:n_train]), ("test", index[n_train:])):
            (folder / split / str(label)).mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(images[i]).save(folder / split / str(label) / f"{i}.png")
    return source, target


def train(run_root: Path, name: str, *overrides: str) -> dict:
    started = time.time()
    cmd = [sys.executable, str(REPO / "runner" / "train.py"), *COMMON, f"run.root={run_root}", f"run.name={name}",
           *overrides]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    summary = json.loads((run_root / name / "summary.json").read_text())
    return {"accuracy": summary["final"]["test"]["accuracy"], "seconds": time.time() - started,
            "samples": summary["final"]["test"]["samples"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="")
    parser.add_argument("--model", default="timm:resnet18")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="transfer-"))
    source, target = write_digits(workdir, args.per_class)
    runs, model = workdir / "runs", f"model.name={args.model}"
    pre = train(runs, "pretrain-0-4", f"data.root={source}", model, f"train.epochs={args.pretrain_epochs}")
    print(f"pretrained on 0-4: test accuracy {pre['accuracy']:.4f} ({pre['samples']} images), {pre['seconds']:.0f} s")
    length = [f"data.root={target}", model, f"train.epochs={args.epochs}"]
    tuned = train(runs, "finetuned-5-9", *length, f"model.weights={runs / 'pretrain-0-4'}")
    scratch = train(runs, "scratch-5-9", *length)
    print(f"5-9 with {args.per_class} training images per class, {args.epochs} epochs, {args.model} at 32x32, "
          f"test on {tuned['samples']} images:")
    for label, result in (("fine-tuned from 0-4", tuned), ("from scratch", scratch)):
        print(f"  {label:<20} accuracy {result['accuracy']:.4f}   wall {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
