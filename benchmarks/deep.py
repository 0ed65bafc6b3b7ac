"""The deep-dive cases behind `python -m benchmarks.bench --full`, one process, one thread, in rounds:

- compute bound: forward+backward+step on one fixed batch in memory, in float32 and with the speed
  options (bf16 autocast, channels_last): the ceilings for the runner;
- plain loop: a hand-written loop on the runner's own device data path (uint8 in memory, batched gather,
  crop/flip, normalise);
- tutorial loop: torchvision dataset, PIL transforms, DataLoader, as the tutorials write it;
- the runner end to end on the device path, on the torchvision DataLoader path, and with its speed options.

Unlike the default cases these keep each preset's augmentation (random crop and flip for SimpleCNN).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from benchmarks.launch import CaseFailed, runner_case
from benchmarks.workloads import Workload

SPEED_OPTIONS = ["train.mixed_precision=bf16", "model.channels_last=true"]


def augmentation(workload: Workload) -> tuple[int, bool]:
    """(crop padding, flip) of the workload's preset."""
    return (4, True) if workload.data == "cifar10" else (0, False)


def timed(step, batch: int, seconds: float, warmup: int) -> float:
    """img/s of `step()` (one batch each) over about `seconds`, after a warm-up."""
    for _ in range(warmup):
        step()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    return count * batch / (time.perf_counter() - start)


def endless(epoch):
    while True:
        yield from epoch()


def training_step(model, optimizer, fast: bool = False):
    import torch
    import torch.nn.functional as F

    def step(images, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def compute_bound(workload: Workload, seconds: float, fast: bool = False) -> float:
    """One fixed batch in memory; `fast` adds bf16 autocast and channels_last."""
    import torch

    model = workload.make_model()
    images, labels = torch.randn(workload.batch, *workload.shape), torch.randint(0, 10, (workload.batch,))
    if fast:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    step = training_step(model, workload.make_optimizer(model.parameters()), fast)
    return timed(lambda: step(images, labels), workload.batch, seconds, workload.warmup_steps)


def plain_loop(workload: Workload, folder: Path, seconds: float) -> float:
    """The runner's device data path, driven by a hand-written loop."""
    from runner.data.batches import DeviceBatches, Normalise
    from runner.data.datasets import NORMALISATION
    from runner.data.order import TrainOrder
    from runner.plan import Config, Plan, TrainConfig

    split = workload.load_train_split(folder)
    pad, flip = augmentation(workload)
    plan = Plan.resolve(Config(train=TrainConfig(global_batch_size=workload.batch)), world=1)
    order = TrainOrder(plan.for_train_size(len(split)), len(split), 0, 0)
    batches = DeviceBatches(split, Normalise(*NORMALISATION[workload.data], "cpu"), "cpu", seed=0,
                            crop_padding=pad, flip=flip, order=order)
    model = workload.make_model()
    step = training_step(model, workload.make_optimizer(model.parameters()))
    stream = endless(lambda: batches.train_epoch(0))
    return timed(lambda: step(*next(stream)), workload.batch, seconds, workload.warmup_steps)


def tutorial_loop(workload: Workload, folder: Path, seconds: float) -> float:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from runner.data.datasets import NORMALISATION, cifar10_class

    pad, flip = augmentation(workload)
    augment = [transforms.RandomCrop(32, padding=pad), transforms.RandomHorizontalFlip()] if flip else []
    transform = transforms.Compose(augment + [transforms.ToTensor(),
                                              transforms.Normalize(*NORMALISATION[workload.data])])
    source = datasets.MNIST if workload.data == "mnist" else cifar10_class()
    loader = DataLoader(source(str(folder), train=True, transform=transform), batch_size=workload.batch,
                        shuffle=True, num_workers=0)
    model = workload.make_model()
    step = training_step(model, workload.make_optimizer(model.parameters()))
    stream = endless(lambda: loader)
    return timed(lambda: step(*next(stream)), workload.batch, seconds, workload.warmup_steps)


def runner_variants(workload: Workload, folder: Path, seconds: float, ceiling: float, workdir: Path,
                    round_index: int) -> dict:
    """The runner on its device path, its torchvision path, and with the speed options; each sized to
    about `seconds` at the compute-bound rate `ceiling`."""
    pad, flip = augmentation(workload)
    preset = [f"data.crop_padding={pad}", f"data.flip={str(flip).lower()}"]
    steps = max(5 * workload.warmup_steps, round(seconds * ceiling / workload.batch))
    variants = {"runner": preset, "runner_torchvision": preset + ["data.loader=torchvision"],
                "runner_fast": preset + SPEED_OPTIONS}
    out = {}
    for label, extra in variants.items():
        name = f"deep-r{round_index}-{workload.name}-{label}"
        result = runner_case(workload, folder, 1, steps, workdir, name, extra)
        out[label] = result[workload.name]["img_per_s"]
    return out


def one_round(workload: Workload, folder: Path, seconds: float, workdir: Path, round_index: int) -> dict:
    measured = {"compute_bound": compute_bound(workload, seconds),
                "compute_bound_fast": compute_bound(workload, seconds, fast=True),
                "plain_loop": plain_loop(workload, folder, seconds),
                "tutorial_loop": tutorial_loop(workload, folder, seconds)}
    measured |= runner_variants(workload, folder, seconds, measured["compute_bound"], workdir, round_index)
    print(f"deep round {round_index} {workload.name}: "
          + ", ".join(f"{k} {v:,.0f}" for k, v in measured.items()) + " img/s", flush=True)
    return measured


RATIOS = [("runner", "compute_bound"), ("runner", "plain_loop"), ("runner", "tutorial_loop"),
          ("runner_torchvision", "tutorial_loop"), ("runner_fast", "tutorial_loop"),
          ("runner_fast", "compute_bound_fast")]


def deep_dive(workloads: list[Workload], folders: dict, seconds: float, rounds: int, workdir: Path) -> dict:
    """Medians over `rounds` interleaved rounds, and their ratios, per workload (one thread)."""
    import torch

    torch.set_num_threads(1)  # as the runner's dist.threads=1 in these cases
    per_round: dict[str, list[dict]] = {w.name: [] for w in workloads}
    failures = []
    for round_index in range(1, rounds + 1):
        for workload in workloads:
            try:
                per_round[workload.name].append(one_round(workload, folders[workload.name], seconds, workdir,
                                                          round_index))
            except CaseFailed as failure:
                failures.append(f"deep round {round_index} {workload.name}: {failure}")
                print(f"deep round {round_index} {workload.name} FAILED: {failure}", flush=True)
    report = {"failures": failures}
    for name, measured in per_round.items():
        if not measured:
            continue
        medians = {label: statistics.median(m[label] for m in measured) for label in measured[0]}
        report[name] = {"img_per_s": medians,
                        "ratios": {f"{a} / {b}": medians[a] / medians[b] for a, b in RATIOS}}
        print(f"\ndeep dive, {name} (medians of {len(measured)} rounds, 1 thread):")
        for label, value in medians.items():
            print(f"  {label:<22} {value:>10,.0f} img/s")
        for label, value in report[name]["ratios"].items():
            print(f"  {label:<38} {value:5.2f}x")
    return report
