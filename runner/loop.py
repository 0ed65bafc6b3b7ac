"""The training loop, as named steps: micro-step, close the optimizer step, agree across ranks, report, the
events that fall due (evaluation, checkpoint), and stopping.

The only blocking collective of an optimizer step is DDP's gradient all-reduce. The ranks' agreement on
the loss and on preemption is an all-reduce started without waiting and read one step later (on GPUs: at
the next log, eval or save boundary, so that no step waits for the host). All ranks read the same result
at the same step, so they stop at the same step and save the same checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from runner import preemption
from runner.context import RunContext
from runner.errors import UserError
from runner.memory import WindowGuard, does_not_fit
from runner.optim import l1_penalty
from runner.state import COMPLETED, EARLY_STOPPING, MAX_STEPS, PREEMPTED, RunState
from runner.throughput import peak_memory_per_rank

if TYPE_CHECKING:
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler

    from runner.data.batches import DeviceBatches, LoaderBatches
    from runner.checkpoint import Checkpointer
    from runner.ema import EmaWeights
    from runner.finetune import Freezing
    from runner.metrics import Validation
    from runner.throughput import Throughput


@dataclass
class Agreed:
    step: int
    train_loss: float        # mean over ranks and micro-steps
    signalled: bool          # some rank received SIGUSR1/SIGTERM


class Agreement:
    """(loss, preemption flag) summed over ranks: started without blocking, read a step later."""

    def __init__(self, acc, read_every_step: bool):
        self.acc, self.read_every_step = acc, read_every_step
        self.pending: list[tuple[int, torch.Tensor, object]] = []

    def start(self, step: int, window_loss: torch.Tensor, signalled: bool) -> None:
        values = torch.stack([window_loss.float(), window_loss.new_tensor(float(signalled), dtype=torch.float32)])
        handle = None
        if self.acc.num_processes > 1:
            handle = torch.distributed.all_reduce(values, async_op=True)
        self.pending.append((step, values, handle))

    def read(self, everything: bool) -> list[Agreed]:
        """The agreements that are due: all of them at a boundary, else all but the newest (on CPU)."""
        if not everything and not self.read_every_step:
            return []
        ready, self.pending = (self.pending, []) if everything else (self.pending[:-1], self.pending[-1:])
        out = []
        for step, values, handle in ready:
            if handle is not None:
                handle.wait()
            loss, signalled = values.tolist()
            out.append(Agreed(step, loss / self.acc.num_processes, signalled > 0))
        return out


@dataclass
class Trainer:
    ctx: RunContext
    model: torch.nn.Module
    optimizer: AcceleratedOptimizer
    scheduler: AcceleratedScheduler
    batches: DeviceBatches | LoaderBatches
    validation: Validation
    checkpoints: Checkpointer
    state: RunState
    speed: Throughput
    segment_started: float         # when this process started (time.time())
    freezing: Freezing                # model.freeze, released at model.unfreeze_epoch
    ema: EmaWeights                   # the weights' moving average (train.ema_decay)
    skipped_steps: int = 0
    train_loss: float = float("nan")
    stop: str | None = None
    agreement: Agreement = field(init=False)
    memory: WindowGuard = field(init=False)
    base_times: tuple[float, float] = field(init=False)

    def __post_init__(self):
        self.agreement = Agreement(self.ctx.acc, read_every_step=self.ctx.acc.device.type == "cpu")
        self.base_times = (self.state.train_seconds, self.state.wall_seconds)
        self.memory = WindowGuard(self.ctx.acc, self.model, enabled=self.ctx.plan.auto_micro_batch)
        self.state.micro_batch = self.ctx.plan.micro_batch

    def run(self) -> str:
        state = self.state
        self.model.train()
        self.speed.start()
        while self.stop is None and not self.ctx.plan.finished(state):
            plan = self.ctx.plan  # a micro batch that ran out of memory changes it (runner/memory.py)
            # At every epoch start, the first after a resume too. An unfreeze wraps the model anew (DDP): the
            # memory guard must drive the new wrapper.
            self.model = self.memory.model = self.freezing.at_epoch(self.model, state.epoch, self.ctx.acc)
            window_loss, micro = None, 0  # the accumulation window's summed micro-batch losses
            data_started = time.perf_counter()
            for x, y in self.batches.train_epoch(state.epoch, state.step_in_epoch):
                self.speed.add_data_wait(time.perf_counter() - data_started)
                micro += 1
                if micro == 1:
                    self.memory.begin()
                loss = self.memory.attempt(self.micro_step, x, y, micro == plan.accumulation)
                if loss is not None:
                    window_loss = loss if window_loss is None else window_loss + loss
                if micro == plan.accumulation:
                    failed = self.memory.failed_ranks()
                    if failed:  # every rank drops the window and redoes it at the smaller micro batch
                        self.shrink_micro_batch(failed, x.shape[1:])
                        break
                    self.memory.average_gradients()
                    self.close_step(window_loss / plan.accumulation)
                    window_loss, micro = None, 0
                    if self.stop is not None or plan.finished(state):
                        break
                data_started = time.perf_counter()
        self.speed.pause()
        plan = self.ctx.plan
        if plan.finished(state):  # a signal that arrives with the last step changes nothing: the run is done
            self.stop = EARLY_STOPPING if state.early_stopped else MAX_STEPS if plan.out_of_steps(
                state.global_step) else COMPLETED
        return self.stop

    def micro_step(self, x, y, last_in_window: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients are synchronised on the window's last one
        (by DDP, or under train.micro_batch_size=auto by the window guard once the window is complete)."""
        cfg, acc = self.ctx.cfg, self.ctx.acc
        sync = last_in_window and self.memory.syncs_in_backward
        with contextlib.nullcontext() if sync else acc.no_sync(self.model):
            loss = F.cross_entropy(self.model(x).float(), y, label_smoothing=cfg.train.label_smoothing)
            if cfg.optim.l1:
                loss = loss + cfg.optim.l1 * l1_penalty(self.model)
            acc.backward(loss / self.ctx.plan.accumulation)
        return loss.detach()

    def shrink_micro_batch(self, failed: list[int], input_shape) -> None:
        """Out of memory on `failed` ranks: drop the window, halve the micro batch, redo the same window."""
        plan, state = self.ctx.plan, self.state
        self.memory.drop_window(self.optimizer.optimizer)
        ranks = ", ".join(map(str, failed))
        if plan.micro_batch == 1:
            raise does_not_fit(self.ctx.cfg.model.name, (1, *input_shape), failed,
                               peak_memory_per_rank(self.ctx.acc.device), state.global_step + 1,
                               self.checkpoints.newest())
        smaller = plan.with_micro_batch(plan.fitting_micro_batch(plan.micro_batch // 2))
        self.ctx.log.info(f"out of memory at micro batch {plan.micro_batch} on rank {ranks}: micro "
                          f"{smaller.micro_batch} x accumulation {smaller.accumulation} from step "
                          f"{state.global_step + 1}")
        self.batches.regroup(smaller)
        self.ctx = dataclasses.replace(self.ctx, plan=smaller)
        state.micro_batch = smaller.micro_batch

    def close_step(self, window_loss: torch.Tensor) -> None:
        """The window's gradients are complete: step, count, agree, report, and do what falls due."""
        plan, state, cfg = self.ctx.plan, self.state, self.ctx.cfg
        if cfg.train.grad_clip:
            self.ctx.acc.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.optimizer.zero_grad(set_to_none=True)  # AcceleratedOptimizer's, without its inspect
        if self.optimizer.step_was_skipped:
            self.skipped_steps += 1
        else:
            self.scheduler.step()
        self.ema.update(state.global_step)
        epoch_done = state.advance(plan.steps_per_epoch)
        self.speed.add_step(plan.global_batch // plan.world)
        self.agreement.start(state.global_step, window_loss, preemption.stop_requested())
        log_due = self.ctx.log.due(state.global_step)
        eval_due = self.validation.due(state.global_step, state.epoch, epoch_done)
        save_due = self.checkpoints.due(state.global_step, state.epoch, epoch_done)
        boundary = log_due or eval_due or save_due or plan.finished(state)
        self.settle(self.agreement.read(everything=boundary))
        if self.stop is not None:  # stopping here: this step's agreement too, so no collective is left pending
            self.settle(self.agreement.read(everything=True))
        # A train point also falls on every step that may write a checkpoint (a save, an evaluation that may
        # keep the best, the end, a stop), so no log window straddles a checkpoint: a run resumed from one
        # logs the same points, with the same values, as the run that wrote it.
        self.report(boundary or self.stop is not None, state.epoch - epoch_done)
        if eval_due and self.evaluate_and_track_best() and cfg.checkpoint.keep_best:
            save_due = True
        if save_due or self.stop or plan.finished(state):
            self.save()

    def settle(self, agreed: list[Agreed]) -> None:
        for a in agreed:
            if not math.isfinite(a.train_loss):
                last = self.checkpoints.newest()
                raise UserError(f"non-finite training loss at step {a.step} (epoch {self.state.epoch + 1}); "
                                f"stopped without saving; last good checkpoint: {last}")
            self.train_loss = a.train_loss
            self.ctx.log.add_step_loss(a.train_loss)
            if a.signalled:
                self.stop = PREEMPTED

    def report(self, log_due: bool, epoch: int) -> None:
        """A train record at log steps; the bar (or nothing) otherwise. `epoch`: the one this step was in."""
        state, log_window = self.state, None
        lr = self.scheduler.get_last_lr()[0]
        if log_due:
            log_window = self.speed.take_window()
            window_loss = self.ctx.log.take_window_loss()
            self.ctx.log.event(state.global_step, epoch, "train", {"loss": window_loss}, lr=lr, throughput=log_window)
        self.ctx.log.progress(state.global_step, epoch, self.ctx.plan.epochs, self.train_loss, lr, log_window)

    def evaluate_and_track_best(self) -> bool:
        """Evaluate on the held-out split; True if the monitored metric improved."""
        self.speed.pause()
        state, cfg, log = self.state, self.ctx.cfg, self.ctx.log
        metrics = self.validation.held_out(self.model, state.global_step)
        split = self.validation.split_name
        log.event(state.global_step, state.epoch, split, metrics)
        averaged = (f" | ema accuracy {metrics['ema_accuracy']:.4f} loss {metrics['ema_loss']:.4f}"
                    if "ema_accuracy" in metrics else "")
        log.info(f"{split} step {state.global_step}: accuracy {metrics['accuracy']:.4f} "
                 f"loss {metrics['loss']:.4f} f1 {metrics['f1']:.4f}{averaged}")
        improved = state.record_eval(metrics[cfg.eval.monitor], cfg.eval.mode, cfg.eval.min_delta,
                                     cfg.eval.patience)
        self.speed.start()
        return improved

    def save(self) -> None:
        if not self.checkpoints.enabled:
            return
        self.speed.pause()
        if not all(p.isfinite().all() for p in self.model.parameters()):
            raise UserError(f"non-finite weights after step {self.state.global_step}; stopped without saving")
        self.state.train_seconds, self.state.wall_seconds = self.times()
        self.checkpoints.save(self.state)
        self.speed.start()

    def times(self) -> tuple[float, float]:
        """(training seconds, wall seconds) over all segments of the run so far."""
        return (self.base_times[0] + self.speed.total["seconds"],
                self.base_times[1] + time.time() - self.segment_started)
