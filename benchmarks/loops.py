"""The loops the runner is compared with, launched as their users launch them (one process, or torchrun):
a hand-written Accelerate loop over in-memory tensors, and PyTorch Lightning's Trainer over a
TensorDataset DataLoader (strategy ddp on more than one process).

    [torchrun --nproc_per_node N] benchmarks/loops.py --out RESULT.json \
        accelerate.cnn=FOLDER:STEPS accelerate.linear=FOLDER:STEPS lightning.cnn=FOLDER:STEPS ...

Each framework in turn, in the order given, trains its workloads: warm-up steps, then STEPS timed steps,
on one thread per process. Rank 0 writes the global img/s of the timed steps and, if BENCH_LAUNCHED_AT (a
Unix time) is set, the seconds from then to the end of the first optimizer step of the first framework.
Several frameworks share one command because on 2 cores a command's imports cost as much as its steps.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repo's packages
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.workloads import WORKLOADS  # noqa: E402
from runner.cli import Command  # noqa: E402
from runner.errors import UserError  # noqa: E402


class StepTimer:
    """Marks of a training loop: the end of its first step (start-up, from the launch) and the steady
    section between the end of the warm-up and the end of the last step."""

    def __init__(self, warmup_steps: int, steps: int, launched_at: float | None):
        self.warmup_steps, self.steps, self.launched_at = warmup_steps, steps, launched_at
        self.done = 0
        self.first_step_at = self.steady_from = self.steady_to = 0.0

    def step_done(self):
        self.done += 1
        if self.done == 1:
            self.first_step_at = time.time()
        if self.done == self.warmup_steps:
            self.steady_from = time.perf_counter()
        if self.done == self.warmup_steps + self.steps:
            self.steady_to = time.perf_counter()

    def result(self, global_batch: int) -> dict:
        seconds = self.steady_to - self.steady_from
        out = {"img_per_s": self.steps * global_batch / seconds, "steps": self.steps, "seconds": seconds}
        if self.launched_at:
            out["startup_seconds"] = self.first_step_at - self.launched_at
        return out


def rank_batches(x, y, batch: int, world: int, rank: int):
    """Endless micro-batches of this rank: a fresh permutation each epoch, shared by all ranks, cut into
    disjoint per-rank slices."""
    import torch

    epoch = 0
    while True:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        rows = order[:len(y) // (batch * world) * batch * world].view(-1, world, batch)[:, rank]
        for index in rows:
            yield x[index], y[index]
        epoch += 1


def accelerate_loop(jobs: list, timers: list) -> None:
    """The loop Accelerate's documentation shows, on tensors in memory."""
    import torch.nn.functional as F
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    for (workload, folder), timer in zip(jobs, timers):
        x, y = workload.load_normalised(folder)
        model = workload.make_model()
        model, optimizer = acc.prepare(model, workload.make_optimizer(model.parameters()))
        batches = rank_batches(x, y, workload.batch, acc.num_processes, acc.process_index)
        model.train()
        for _ in range(timer.warmup_steps + timer.steps):
            images, labels = next(batches)
            acc.backward(F.cross_entropy(model(images), labels))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            timer.step_done()


def lightning_loop(jobs: list, timers: list) -> None:
    """A LightningModule and Trainer as Lightning's documentation writes them; on more than one process it
    joins the process group that an earlier loop in this process started, as Lightning does."""
    import logging
    import warnings

    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    warnings.filterwarnings("ignore")  # advice about DataLoader workers and loggers, not results
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    class Classifier(pl.LightningModule):
        def __init__(self, workload):
            super().__init__()
            self.workload, self.net = workload, workload.make_model()

        def training_step(self, batch, index):
            images, labels = batch
            return F.cross_entropy(self.net(images), labels)

        def configure_optimizers(self):
            return self.workload.make_optimizer(self.parameters())

    class Timing(pl.Callback):
        def __init__(self, timer):
            self.timer = timer

        def on_train_batch_end(self, *args):
            self.timer.step_done()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    for (workload, folder), timer in zip(jobs, timers):
        x, y = workload.load_normalised(folder)
        loader = DataLoader(TensorDataset(x, y), batch_size=workload.batch, shuffle=True, drop_last=True)
        trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
                             max_steps=timer.warmup_steps + timer.steps, callbacks=[Timing(timer)], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(Classifier(workload), loader)


FRAMEWORKS = {"accelerate": accelerate_loop, "lightning": lightning_loop}


def parse_jobs(overrides: list[tuple[str, str]]) -> dict[str, list[tuple]]:
    """`framework.workload=FOLDER:STEPS` arguments -> {framework: [(workload, folder, steps)]}, in order."""
    jobs: dict[str, list[tuple]] = {}
    for key, text in overrides:
        framework, _, name = key.partition(".")
        folder, _, steps = text.rpartition(":")
        if framework not in FRAMEWORKS or name not in WORKLOADS or not steps.isdigit() or not folder:
            raise UserError(f"{key}={text}: expected FRAMEWORK.WORKLOAD=FOLDER:STEPS with a framework from "
                            f"{', '.join(FRAMEWORKS)} and a workload from {', '.join(WORKLOADS)}")
        jobs.setdefault(framework, []).append((WORKLOADS[name], Path(folder), int(steps)))
    if not jobs:
        raise UserError("nothing to run: give FRAMEWORK.WORKLOAD=FOLDER:STEPS arguments")
    return jobs


def run(options: dict, overrides: list) -> int:
    import torch

    if "--out" not in options:
        raise UserError("--out RESULT.json is needed")
    launched_at = float(os.environ["BENCH_LAUNCHED_AT"]) if os.environ.get("BENCH_LAUNCHED_AT") else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    results = {}
    for framework, jobs in parse_jobs(overrides).items():
        torch.set_num_threads(1)
        # Start-up counts to the first step of the first loop; later ones start in a warm process.
        timers = [StepTimer(w.warmup_steps, steps, None if results or i else launched_at)
                  for i, (w, _, steps) in enumerate(jobs)]
        FRAMEWORKS[framework]([(w, folder) for w, folder, _ in jobs], timers)
        results[framework] = {w.name: timer.result(w.batch * world) for (w, _, _), timer in zip(jobs, timers)}
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a gloo group left to exit handlers sometimes aborts
    if int(os.environ.get("RANK", "0")) == 0:
        Path(options["--out"]).write_text(json.dumps({"world": world, "results": results}))
    return 0


COMMAND = Command(__doc__, {"--out": "value"}, run)


def main(argv=None) -> int:
    return COMMAND.main(argv)


if __name__ == "__main__":
    sys.exit(main())
