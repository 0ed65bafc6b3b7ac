"""Out of memory never ends a run, and never changes the experiment (train.micro_batch_size=auto).

The global batch is the experiment; the micro batch is only what one device holds at once. When a forward
or backward pass runs out of memory on any rank, the window's partial gradients are dropped, the micro
batch halves (to the next divisor of a rank's share of the step), accumulation grows to match, and the same
window is redone on the same samples: the run continues on the trajectory it would have had, had it
started with the smaller micro batch.

Why the ranks cannot deadlock: in auto mode the only collective inside a window is DDP's buffer broadcast at
its first forward, which every rank reaches before any can fail (WindowGuard.begin). Every micro-step's backward
runs under no_sync, so DDP's reducer never starts a gradient all-reduce that a failed rank would leave
half-done (an exception inside DDP's syncing backward leaves the others waiting in buckets the failed rank
never sends). A rank that runs out of memory skips the rest of its window's compute; then every rank, failed
or not, joins one small all-reduce of per-rank flags at the window's end, the same point for all. If no flag
is set, the gradients are averaged by hand (the all-reduce DDP would have done, in chunks) before the
optimizer step; if any is set, every rank drops the window and redoes it. Runs with a fixed micro batch
keep DDP's all-reduce, overlapped with the backward pass, and pay nothing. (Composer's auto micro-batching
agrees on a flag after the forward and still deadlocks when only some ranks run out of memory in the
backward, as its PR 2117 says.)
"""
from __future__ import annotations

import dataclasses

import torch

from runner.errors import UserError

CHUNK_BYTES = 25 * 2**20  # gradients averaged per all-reduce: DDP's default bucket size


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError, or what Accelerate recognises as one: the CPU allocator raises a plain
    RuntimeError ("DefaultCPUAllocator: can't allocate memory"), as do some device libraries."""
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(error, torch.OutOfMemoryError) or should_reduce_batch_size(error)


def release_cached_memory(device: torch.device) -> None:
    """After an out-of-memory error: hand the allocator's cached blocks back so the smaller batch can fit."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def resume_micro_batch(ctx, batches, micro_batch: int):
    """The run context to continue with: under auto, the largest micro batch at most the one the run last
    trained at (a divisor of this world's share of a step); otherwise unchanged."""
    plan = ctx.plan
    if not plan.auto_micro_batch or not micro_batch:
        return ctx
    fitting = plan.fitting_micro_batch(micro_batch)
    if fitting == plan.micro_batch:
        return ctx
    plan = plan.with_micro_batch(fitting)
    batches.regroup(plan)
    ctx.log.info(f"micro batch {plan.micro_batch} x accumulation {plan.accumulation}: the micro batch this run "
                 f"last trained at (train.micro_batch_size=auto)")
    return dataclasses.replace(ctx, plan=plan)


class WindowGuard:
    """One accumulation window under train.micro_batch_size=auto: catches out-of-memory errors, agrees on
    them across ranks at the window's end, and averages the gradients when none happened. Disabled (for a
    fixed micro batch) it runs each micro-step as it is and agrees on nothing."""

    def __init__(self, acc, model: torch.nn.Module, enabled: bool):
        self.acc, self.model, self.enabled = acc, model, enabled
        self.failed = False                      # this rank ran out of memory in the current window
        self.saved_buffers: list[torch.Tensor] = []

    @property
    def syncs_in_backward(self) -> bool:
        """Whether DDP all-reduces in the window's last backward (fixed micro batch) or the guard does."""
        return not self.enabled

    def begin(self) -> None:
        """At a window's first micro-step (of every attempt): keep the buffers, so that a dropped window
        leaves no trace in them (BatchNorm's running statistics), and make every rank agree that DDP
        broadcasts them in this forward. DDP clears that flag only after a forward that returned: a forward
        that ran out of memory would leave it set on one rank alone, and that rank's next forward would
        wait for a broadcast the others never send."""
        if not self.enabled:
            return
        self.failed = False
        if hasattr(self.model, "require_forward_param_sync"):  # wrapped in DistributedDataParallel
            self.model.require_forward_param_sync = True
        self.saved_buffers = [b.detach().clone() for b in self.acc.unwrap_model(self.model).buffers()]

    def attempt(self, micro_step, *args):
        """micro_step(*args), or None once this rank has run out of memory in this window (it then skips
        the window's remaining compute but still reaches the agreement)."""
        if not self.enabled:
            return micro_step(*args)
        if self.failed:
            return None
        try:
            return micro_step(*args)
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(e):
                raise
            self.failed = True
        release_cached_memory(self.acc.device)  # outside the except block: its traceback held the activations
        return None

    def failed_ranks(self) -> list[int]:
        """The ranks that ran out of memory in this window; every rank calls this once per window."""
        if not self.enabled or self.acc.num_processes == 1:
            return [0] if self.failed else []
        flags = torch.zeros(self.acc.num_processes, device=self.acc.device)
        flags[self.acc.process_index] = float(self.failed)
        torch.distributed.all_reduce(flags)  # reading it waits for the device: the price of agreeing
        return [rank for rank, flag in enumerate(flags.tolist()) if flag]

    def drop_window(self, optimizer) -> None:
        """Forget everything the failed window did: its gradients and its buffer updates."""
        optimizer.zero_grad(set_to_none=True)
        for buffer, saved in zip(self.acc.unwrap_model(self.model).buffers(), self.saved_buffers):
            buffer.copy_(saved)
        release_cached_memory(self.acc.device)

    def average_gradients(self) -> None:
        """What DDP's all-reduce does: each gradient divided by the world size, then summed over ranks."""
        if not self.enabled or self.acc.num_processes == 1:
            return
        world = self.acc.num_processes
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # unused by this forward: every rank must still send the same layout
                p.grad = torch.zeros_like(p)
        for chunk in chunks([p.grad for p in params], CHUNK_BYTES):
            flat = torch.cat([g.reshape(-1) for g in chunk]).div_(world)
            torch.distributed.all_reduce(flat)
            copy_back(flat, chunk)


def chunks(tensors: list[torch.Tensor], max_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of one dtype of at most `max_bytes` (a larger tensor alone): one all-reduce each."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not out or size + nbytes > max_bytes or out[-1][0].dtype != t.dtype:
            out.append([])
            size = 0
        out[-1].append(t)
        size += nbytes
    return out


def copy_back(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def does_not_fit(model_name: str, input_shape: tuple, ranks: list[int], peak_mb: list[float], step: int,
                 last_checkpoint: str) -> UserError:
    """Even one sample per micro-step does not fit: nothing left to shrink."""
    peaks = ", ".join(f"rank {r} {peak_mb[r]:,.0f} MiB" for r in ranks)
    return UserError(f"out of memory at micro batch 1 on rank {', '.join(map(str, ranks))}: model {model_name} "
                     f"with input shape {list(input_shape)} does not fit even one sample per forward pass "
                     f"(peak memory {peaks}) at step {step}; last checkpoint: {last_checkpoint}")
