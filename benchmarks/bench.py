"""Benchmark: the runner against the compute bound, a hand-written loop and the tutorial loop, side by side.

    python -m benchmarks.bench [--seconds 6] [--json runs/bench.json] [--only mnist|cifar]

For MNIST-shaped data (Linear 784->10, batch 32) and CIFAR-shaped data (SimpleCNN, batch 64) it measures,
in one run on the same files (written in the real formats to a temporary directory):
- compute bound: forward+backward+step on one fixed batch already in memory (also with bf16 autocast and
  channels_last, the ceiling for the runner's speed options);
- plain loop: a hand-written loop over the uint8 tensor in memory (index, augment, normalise, step);
- tutorial loop: torchvision dataset, PIL transforms, DataLoader, as the tutorials write it;
- the runner end to end (train.py in a subprocess; its summary.json img/s), on the device path, on the
  torchvision DataLoader path, and with its speed options (bf16 autocast, channels_last);
- the runner on 1 process x 1 thread against 2 processes x 1 thread over gloo.
Ratios are computed from figures measured in this one run (medians of --repeats rounds). Timed sections
exclude start-up and warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.cnn import SimpleCNN
from models.linear import LinearClassifier
from runner.datasets import NORMALISATION, cifar10_class
from tests.sample_files import write_cifar10, write_mnist

REPO = Path(__file__).resolve().parent.parent

CASES = {
    "mnist": {"data": "mnist", "shape": (1, 28, 28), "batch": 32, "lr": 0.01, "momentum": 0.0,
              "model": "linear", "kwargs": "{in_features: 784}", "augment": False, "train_size": 20000},
    "cifar": {"data": "cifar10", "shape": (3, 32, 32), "batch": 64, "lr": 0.01, "momentum": 0.9,
              "model": "simple_cnn", "kwargs": "{}", "augment": True, "train_size": 5000},
}


def make_model(case: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return LinearClassifier(case["shape"]) if case["model"] == "linear" else SimpleCNN(case["shape"])


def timed(step, batch: int, seconds: float, warmup: int = 5) -> float:
    """img/s of `step()` (one batch each) over about `seconds`, after a warm-up."""
    for _ in range(warmup):
        step()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    return count * batch / (time.perf_counter() - start)


def endless(epoch):
    """Batches from `epoch()` again and again."""
    while True:
        yield from epoch()


def compute_bound(case: dict, seconds: float, fast: bool = False) -> float:
    """One fixed batch in memory; `fast` adds the runner's speed options (bf16 autocast, channels_last)."""
    model = make_model(case)
    opt = torch.optim.SGD(model.parameters(), lr=case["lr"], momentum=case["momentum"])
    x, y = torch.randn(case["batch"], *case["shape"]), torch.randint(0, 10, (case["batch"],))
    if fast:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, case["batch"], seconds)


def plain_loop(case: dict, images: torch.Tensor, labels: torch.Tensor, seconds: float) -> float:
    """The same device-resident data path, written by hand without the runner."""
    from runner.data import DeviceBatches, Normalise, TrainOrder
    from runner.datasets import ImageSet

    mean, std = NORMALISATION[case["data"]]
    pad = 4 if case["augment"] else 0
    batches = DeviceBatches(ImageSet(images, labels), Normalise(mean, std, "cpu"), "cpu", 0, pad, case["augment"])
    order = TrainOrder(len(labels), 0, case["batch"], case["batch"], 1, 0)
    model = make_model(case)
    opt = torch.optim.SGD(model.parameters(), lr=case["lr"], momentum=case["momentum"])
    stream = endless(lambda: batches.train_epoch(order, 0))

    def step():
        x, y = next(stream)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, case["batch"], seconds)


def tutorial_loop(case: dict, root: Path, seconds: float) -> float:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    mean, std = NORMALISATION[case["data"]]
    if case["augment"]:
        transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                        transforms.ToTensor(), transforms.Normalize(mean, std)])
        dataset = cifar10_class()(str(root), train=True, transform=transform)
    else:
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
        dataset = datasets.MNIST(str(root), train=True, transform=transform)
    loader = DataLoader(dataset, batch_size=case["batch"], shuffle=True, num_workers=0)
    model = make_model(case)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=case["lr"], momentum=case["momentum"])
    stream = endless(lambda: loader)

    def step():
        images, labels = next(stream)
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()

    return timed(step, case["batch"], seconds)


def runner(case: dict, root: Path, out: Path, name: str, epochs: int, extra: list[str],
           processes: int = 1) -> dict:
    """train.py end to end in a subprocess; returns its summary.json (train img/s excludes start-up)."""
    args = [f"--config={case['data'] if case['data'] == 'mnist' else 'cifar10'}", f"data.name={case['data']}",
            f"data.root={root}", f"model.name={case['model']}", f"model.kwargs={case['kwargs']}",
            f"optim.lr={case['lr']}", f"optim.momentum={case['momentum']}", "optim.weight_decay=0",
            "schedule.name=constant", f"train.micro_batch_size={case['batch']}", f"train.epochs={epochs}",
            f"data.crop_padding={4 if case['augment'] else 0}", f"data.flip={str(case['augment']).lower()}",
            "eval.every_epochs=0", "checkpoint.every_epochs=0", "log.every_steps=20", "log.trackers=[]",
            "log.plot=false", f"run.root={out}", f"run.name={name}", "resume=none", "run.overwrite=true"] + extra
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "SLURM_"))}
    env["HF_HOME"] = str(out / "hf_home")
    launcher = [sys.executable]
    if processes > 1:
        launcher = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(processes),
                    "--master_port", str(29500 + os.getpid() % 1000)]
    result = subprocess.run(launcher + [str(REPO / "runner/train.py")] + args, env=env, capture_output=True,
                            text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"runner {name} failed:\n{result.stderr[-3000:]}")
    return json.loads((out / name / "summary.json").read_text())


def steady_img_per_s(run_dir: Path) -> float:
    """Training img/s from the run's log windows after the first, which holds the warm-up (the in-process
    measurements above skip their warm-up steps too)."""
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [w for w in windows if w["split"] == "train"]
    samples = seconds = 0.0
    for before, window in zip(windows, windows[1:]):
        steps = window["step"] - before["step"]
        seconds += steps * window["throughput"]["step_time_ms"] / 1000
        samples += steps * window["throughput"]["img_per_s"] * window["throughput"]["step_time_ms"] / 1000
    return samples / seconds


def bench_case(key: str, seconds: float, workdir: Path, repeats: int) -> dict:
    case = CASES[key]
    root = workdir / key
    if case["data"] == "mnist":
        write_mnist(root, n_train=case["train_size"], n_test=2000)
        from torchvision import datasets
        ds = datasets.MNIST(str(root), train=True)
        images, labels = ds.data.unsqueeze(1), ds.targets
    else:
        write_cifar10(root, per_batch=case["train_size"] // 5, n_test=1000)
        ds = cifar10_class()(str(root), train=True)
        images, labels = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
    per_epoch_s = case["train_size"] / 20000 if key == "mnist" else case["train_size"] / 2500
    epochs = max(2, int(seconds / per_epoch_s))
    out = workdir / "runs"
    rounds = []
    for _ in range(repeats):  # whole rounds, so that a slow spell of a shared machine hits every variant
        measured = {"compute_bound": compute_bound(case, seconds),
                    "compute_bound_fast": compute_bound(case, seconds, fast=True),
                    "plain_loop": plain_loop(case, images, labels, seconds),
                    "tutorial_loop": tutorial_loop(case, root, seconds)}
        summaries = {
            "runner": runner(case, root, out, f"{key}-device", epochs, []),
            "runner_torchvision": runner(case, root, out, f"{key}-torchvision", max(1, epochs // 4),
                                         ["data.loader=torchvision"]),
            "runner_fast": runner(case, root, out, f"{key}-fast", epochs,
                                  ["train.mixed_precision=bf16", "model.channels_last=true"]),
            "runner_1x1": runner(case, root, out, f"{key}-1x1", max(1, epochs // 2), ["dist.threads=1"]),
            "runner_2x1": runner(case, root, out, f"{key}-2x1", max(1, epochs // 2), ["dist.threads=1"],
                                 processes=2),
        }
        measured.update({label: steady_img_per_s(Path(summary["run"])) for label, summary in summaries.items()})
        rounds.append(measured)
    results = {label: statistics.median(r[label] for r in rounds) for label in rounds[0]}
    accuracy = {label: summaries[label]["final"]["test"]["accuracy"] for label in ("runner", "runner_fast")}
    ratios = {
        "runner / compute_bound": results["runner"] / results["compute_bound"],
        "runner / plain_loop": results["runner"] / results["plain_loop"],
        "runner / tutorial_loop": results["runner"] / results["tutorial_loop"],
        "runner_torchvision / tutorial_loop": results["runner_torchvision"] / results["tutorial_loop"],
        "runner_fast / tutorial_loop": results["runner_fast"] / results["tutorial_loop"],
        "runner_fast / compute_bound_fast": results["runner_fast"] / results["compute_bound_fast"],
        "runner_2x1 / runner_1x1": results["runner_2x1"] / results["runner_1x1"],
    }
    return {"batch": case["batch"], "model": case["model"], "repeats": repeats, "img_per_s": results, "ratios": ratios,
            "test_accuracy": accuracy}


def markdown(report: dict) -> str:
    """The README's table: img/s per variant and the ratios, for each data shape."""
    cases = report["cases"]
    keys = list(cases)
    head = "| img/s | " + " | ".join(f"{k} ({cases[k]['model']}, batch {cases[k]['batch']})" for k in keys) + " |"
    lines = [head, "|---" * (len(keys) + 1) + "|"]
    for label in cases[keys[0]]["img_per_s"]:
        lines.append(f"| {label} | " + " | ".join(f"{cases[k]['img_per_s'][label]:,.0f}" for k in keys) + " |")
    for label in cases[keys[0]]["ratios"]:
        lines.append(f"| **{label}** | " + " | ".join(f"{cases[k]['ratios'][label]:.2f}x" for k in keys) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="time per in-process measurement")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", choices=sorted(CASES), help="one data shape only")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every measurement; medians are kept")
    args = parser.parse_args(argv)
    report = {"machine": machine(), "threads": torch.get_num_threads(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for key in [args.only] if args.only else list(CASES):
            report["cases"][key] = bench_case(key, args.seconds, Path(tmp), args.repeats)
            case = report["cases"][key]
            print(f"\n{key} ({case['model']}, batch {case['batch']}) on {report['machine']}")
            for label, value in case["img_per_s"].items():
                print(f"  {label:<22} {value:>12,.0f} img/s")
            for label, value in case["ratios"].items():
                print(f"  {label:<36} {value:6.2f}x")
            print("  test accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in case["test_accuracy"].items()))
    print("\n" + markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
