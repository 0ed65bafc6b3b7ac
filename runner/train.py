"""Train an image classifier, from one CPU process to several GPU nodes.

    python runner/train.py --config digits [section.key=value ...]
    accelerate launch --multi_gpu --num_processes 2 runner/train.py --config cifar10
    torchrun --nproc_per_node 2 runner/train.py --config mnist

The stages below run in order: config, processes, data, model, resume, the loop, the final evaluation.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repo's packages, not runner/*.py as top level
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from runner import preemption  # noqa: E402  (standard library only)

preemption.install()  # before torch is imported: a SIGUSR1 during the slow startup is kept, not fatal

import errno
import math
import os
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from runner import config as configlib
from runner.checkpoint import CheckpointConfig, Checkpointer, RunState, read_manifest
from runner.config import ConfigError, setting
from runner.data import DataConfig, TrainOrder, load_splits, make_batches, shard_range
from runner.distributed import (DistConfig, check_launcher_precision, check_world_fits, launched_world_size,
                                make_accelerator)
from runner.errors import EXIT_LOST_RANK, EXIT_PREEMPTED, EXIT_USER_ERROR, UserError
from runner.metrics import EvalConfig, Evaluator
from runner.model import ModelConfig, build_model, flops_per_sample, parameter_count
from runner.optim import OptimConfig, build_optimizer, l1_penalty
from runner.rundir import RunConfig, check_fingerprint, default_run_name, fingerprint, prepare_run_dir
from runner.schedule import ScheduleConfig, build_scheduler
from runner.throughput import Throughput, device_peak_flops
from runner.tracking import LogConfig, RunLog, summary_table


@dataclass
class TrainConfig:
    epochs: int = setting(10, min=1)
    max_steps: int = setting(0, min=0)                      # stop after N optimizer steps (0: epochs decide)
    micro_batch_size: int = setting(32, min=1)              # per device, per forward pass
    global_batch_size: int = setting(0, min=0)              # samples per optimizer step (0: micro x world)
    gradient_accumulation_steps: int = setting(0, min=0)    # 0: global / (micro x world)
    mixed_precision: str = setting("no", choices=["no", "bf16", "fp16"])
    seed: int = setting(0, min=0)
    grad_clip: float = setting(0.0, min=0.0)                # max gradient norm (0: off)
    label_smoothing: float = setting(0.0, min=0.0, max=0.99)
    fast_dev_run: int = setting(0, min=0)                   # N steps and N eval batches, nothing saved
    overfit_batches: int = setting(0, min=0)                # train and evaluate on N global batches only
    limit_train_batches: int = setting(0, min=0)            # at most N optimizer steps per epoch
    limit_eval_batches: int = setting(0, min=0)             # at most N x eval.batch_size eval samples

    def validate(self):
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU and this host has none; "
                              "use bf16 (autocast runs on CPU) or no")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    resume: str = "auto"  # auto: newest complete checkpoint of this run; none: start fresh; or a path


FLAGS = {"--config": "value", "--print-config": "switch", "--debug": "switch", "--help": "switch", "-h": "switch"}


def batch_sizes(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(global batch, accumulation steps) from the user's knobs, or one line naming the valid choices."""
    micro, per_micro = cfg.micro_batch_size, cfg.micro_batch_size * world
    if not cfg.global_batch_size:
        accumulation = cfg.gradient_accumulation_steps or 1
        return per_micro * accumulation, accumulation
    if cfg.global_batch_size % per_micro:
        lower = cfg.global_batch_size // per_micro * per_micro
        options = " or ".join(str(g) for g in (lower, lower + per_micro) if g)
        micros = [m for m in range(1, cfg.global_batch_size // world + 1)
                  if cfg.global_batch_size % (m * world) == 0]
        raise ConfigError(f"train.global_batch_size={cfg.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={micro} x world size {world} = {per_micro}; nearest valid "
                          f"global batch: {options}; micro batches that divide it: {micros[-4:]}")
    accumulation = cfg.global_batch_size // per_micro
    if cfg.gradient_accumulation_steps and cfg.gradient_accumulation_steps != accumulation:
        raise ConfigError(f"train.gradient_accumulation_steps={cfg.gradient_accumulation_steps} contradicts "
                          f"global {cfg.global_batch_size} / (micro {micro} x world {world}) = {accumulation}")
    return cfg.global_batch_size, accumulation


def evaluate(evaluator, model, batches, split, acc, cfg) -> dict:
    """This rank's disjoint shard of `split` (limited in debug modes); metrics come back reduced."""
    limit = cfg.train.fast_dev_run or cfg.train.limit_eval_batches
    n = min(len(split), limit * cfg.eval.batch_size) if limit else len(split)
    shard = shard_range(n, acc.num_processes, acc.process_index)
    index = torch.arange(shard.start, shard.stop)
    return evaluator.run(acc.unwrap_model(model), batches.eval_batches(split, index, cfg.eval.batch_size),
                         acc.autocast)


def run(cfg: Config, config_label: str) -> int:
    started = time.time()
    # ---- processes ------------------------------------------------------------------------------------------
    world = launched_world_size()
    check_launcher_precision(cfg.train.mixed_precision)
    global_batch, accumulation = batch_sizes(cfg.train, world)
    cfg.train.global_batch_size = global_batch
    dev_run = cfg.train.fast_dev_run
    run_name = cfg.run.name or default_run_name(config_label)
    run_dir = Path(cfg.run.root) / run_name
    acc = make_accelerator(cfg.dist, cfg.train.mixed_precision, accumulation, run_dir,
                           [] if dev_run else cfg.log.trackers)
    torch.manual_seed(cfg.train.seed)  # model init: the same weights on every rank and world size

    # ---- data -----------------------------------------------------------------------------------------------
    with acc.main_process_first():  # a download, if any, happens once
        splits = load_splits(cfg.data, cfg.train.seed)
    augment = bool(cfg.data.crop_padding or cfg.data.flip)
    if cfg.train.overfit_batches:
        splits, augment = splits.overfit(cfg.train.overfit_batches * global_batch), False
    train_set, eval_set, eval_split = splits.train, splits.eval, splits.eval_split
    check_world_fits(acc.num_processes, cfg.train.micro_batch_size, len(train_set), len(eval_set))
    order = TrainOrder(len(train_set), cfg.train.seed, global_batch, cfg.train.micro_batch_size,
                       acc.num_processes, acc.process_index, dev_run or cfg.train.limit_train_batches)
    if order.steps_per_epoch == 0:
        raise UserError(f"the training set ({len(train_set)} samples) is smaller than one global batch "
                        f"({global_batch}); lower train.global_batch_size or train.micro_batch_size")
    batches = make_batches(cfg.data, splits, order, acc.device, cfg.train.seed, augment, cfg.model.channels_last)
    epochs = 1 if dev_run else cfg.train.epochs
    total_steps = order.steps_per_epoch * epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    # ---- model, optimizer, schedule ---------------------------------------------------------------------
    model = build_model(cfg.model, splits.in_shape, splits.num_classes, cfg.data.name)
    flops = flops_per_sample(model, splits.in_shape)
    if cfg.model.sync_batchnorm and acc.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps, order.steps_per_epoch)
    if cfg.model.compile:  # before prepare: compiling after the DDP wrap can crash
        model = torch.compile(model)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)

    # ---- run directory and resume -------------------------------------------------------------------------
    state = RunState()
    state.fingerprint = fingerprint(configlib.to_dict(cfg))
    acc.register_for_checkpointing(state)
    log = RunLog(acc, None if dev_run else run_dir, cfg.log, total_steps)
    checkpoints = Checkpointer(acc, run_dir, cfg.checkpoint, log.info)
    resume_from = None
    if not dev_run:
        if acc.is_main_process:
            prepare_run_dir(run_dir, cfg.resume, cfg.run.overwrite, bool(checkpoints.complete()))
        acc.wait_for_everyone()
        resume_from = checkpoints.choose(cfg.resume)
    if resume_from is not None:
        check_fingerprint(read_manifest(resume_from)["fingerprint"], state.fingerprint, resume_from)
        checkpoints.load(resume_from)
        log.keep_history_until(state.global_step)
        log.info(f"resumed from {resume_from} (epoch {state.epoch + 1}, step {state.global_step})")
    if not dev_run and acc.is_main_process:
        (run_dir / "config.yaml").write_text(configlib.dump(cfg))
    if cfg.log.trackers and not dev_run:
        acc.init_trackers(run_name, config={k: str(v) if isinstance(v, (list, dict)) or v is None else v
                                            for k, v in configlib.flatten(configlib.to_dict(cfg)).items()})
    log.info(f"run {run_dir} | world {acc.num_processes} x {acc.device.type} | precision "
             f"{cfg.train.mixed_precision} | micro {cfg.train.micro_batch_size} x accumulation {accumulation} "
             f"x world {acc.num_processes} = global {global_batch}\ndata {cfg.data.name} ({cfg.data.loader} "
             f"path): train {len(train_set)}, {eval_split} {len(eval_set)}"
             f"{f', test {len(splits.test)}' if eval_split != 'test' else ''} | model "
             f"{cfg.model.name}: {parameter_count(model):,} parameters, {flops / 1e6:.2f} MFLOP/sample (fwd+bwd)"
             f" | {total_steps} steps")

    # ---- the loop -----------------------------------------------------------------------------------------
    evaluator = Evaluator(splits.num_classes, acc.device)
    speed = Throughput(acc.device, acc.num_processes, flops, device_peak_flops(acc.device, cfg.log.peak_tflops))
    stopped, last_eval, last_eval_step, skipped_steps = None, {}, -1, 0
    out_of_steps = lambda: bool(cfg.train.max_steps) and state.global_step >= cfg.train.max_steps  # noqa: E731
    model.train()
    speed.start()
    while stopped is None and state.epoch < epochs and not state.early_stopped and not out_of_steps():
        window_loss = None  # the sum of this accumulation window's micro-batch losses
        data_started = time.perf_counter()
        for x, y in batches.train_epoch(order, state.epoch, state.step_in_epoch):
            speed.add_data_wait(time.perf_counter() - data_started)
            with acc.accumulate(model):
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.train.label_smoothing)
                if cfg.optim.l1:
                    loss = loss + cfg.optim.l1 * l1_penalty(model)
                acc.backward(loss)
                if acc.sync_gradients and cfg.train.grad_clip:
                    acc.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                if acc.sync_gradients:  # as AcceleratedOptimizer.zero_grad, without its per-call inspect
                    optimizer.optimizer.zero_grad(set_to_none=True)
            window_loss = loss.detach() if window_loss is None else window_loss + loss.detach()
            data_started = time.perf_counter()
            if not acc.sync_gradients:
                continue
            # ---- an optimizer step is complete: one all-reduce makes every rank agree on the loss, on
            # faults and on preemption, so all ranks take the same branches below
            if optimizer.step_was_skipped:
                skipped_steps += 1
            else:
                scheduler.step()
            signalled = float(preemption.received is not None)
            if acc.num_processes > 1:
                totals = acc.reduce(torch.stack([window_loss, window_loss.new_tensor(signalled)])).tolist()
            else:
                totals = [window_loss.item(), signalled]
            train_loss = totals[0] / accumulation / acc.num_processes
            window_loss = None
            state.step_in_epoch, state.global_step = state.step_in_epoch + 1, state.global_step + 1
            speed.add_step(global_batch // acc.num_processes)
            if not math.isfinite(train_loss):
                last = (checkpoints.complete() or ["none"])[-1]
                raise UserError(f"non-finite training loss at step {state.global_step} (epoch {state.epoch + 1});"
                                f" stopped without saving; last good checkpoint: {last}")
            lr = scheduler.get_last_lr()[0]
            window = None
            if state.global_step % cfg.log.every_steps == 0 or state.global_step == total_steps:
                window = speed.take_window()
                log.event(state.global_step, state.epoch, "train", {"loss": train_loss}, lr=lr, throughput=window)
            log.progress(state.global_step, state.epoch, epochs, train_loss, lr, window)
            epoch_done = state.step_in_epoch == order.steps_per_epoch
            if epoch_done:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            eval_due = ((cfg.eval.every_steps and state.global_step % cfg.eval.every_steps == 0)
                        or (epoch_done and cfg.eval.every_epochs and state.epoch % cfg.eval.every_epochs == 0))
            save_due = not dev_run and (
                (cfg.checkpoint.every_steps and state.global_step % cfg.checkpoint.every_steps == 0)
                or (epoch_done and cfg.checkpoint.every_epochs and state.epoch % cfg.checkpoint.every_epochs == 0))
            if eval_due:
                speed.pause()
                last_eval, last_eval_step = evaluate(evaluator, model, batches, eval_set, acc, cfg), state.global_step
                log.event(state.global_step, state.epoch, eval_split, last_eval)
                log.info(f"{eval_split} step {state.global_step}: accuracy {last_eval['accuracy']:.4f} "
                         f"loss {last_eval['loss']:.4f} f1 {last_eval['f1']:.4f}")
                if cfg.eval.improved(last_eval[cfg.eval.monitor], state.best_metric):
                    state.best_metric, state.best_step, state.evals_since_best = (
                        last_eval[cfg.eval.monitor], state.global_step, 0)
                    state.best_checkpoint = None if dev_run else f"step_{state.global_step:08d}"
                    save_due = save_due or (cfg.checkpoint.keep_best and not dev_run)
                else:
                    state.evals_since_best += 1
                state.early_stopped = bool(cfg.eval.patience) and state.evals_since_best >= cfg.eval.patience
                speed.start()
            done = state.early_stopped or out_of_steps() or state.epoch >= epochs
            if totals[1] and not done:
                stopped = "preempted"
            if (save_due or done or stopped) and not dev_run:
                speed.pause()
                if not all(p.isfinite().all() for p in model.parameters()):
                    raise UserError(f"non-finite weights after step {state.global_step}; stopped without saving")
                checkpoints.save(state)
                speed.start()
            if done or stopped:
                break
    speed.pause()
    stopped = stopped or ("early_stopping" if state.early_stopped else "max_steps" if out_of_steps() else "completed")

    # ---- preempted: exit so the job can be requeued or restarted ----------------------------------------
    if stopped == "preempted":
        log.info(f"stopped by {preemption.signal_name()} at step {state.global_step}: checkpoint saved")
        log.close()
        if acc.is_main_process and cfg.run.requeue and preemption.should_requeue():
            preemption.requeue_slurm_job(log.info)
        acc.wait_for_everyone()  # a launcher kills the group when one rank exits: let the main one finish first
        acc.end_training()
        return EXIT_PREEMPTED

    # ---- final evaluation and summary -------------------------------------------------------------------
    if last_eval_step < 0 and resume_from is not None and speed.total["steps"] == 0:
        log.info(f"{run_dir} had already finished ({stopped}); evaluating its last checkpoint")
    final = {eval_split: last_eval if last_eval_step == state.global_step
             else evaluate(evaluator, model, batches, eval_set, acc, cfg)}
    if eval_split == "val":
        final["test"] = evaluate(evaluator, model, batches, splits.test, acc, cfg)
    for split, metrics in final.items():
        log.event(state.global_step, state.epoch, f"final_{split}", metrics)
    summary = {
        "run": str(run_dir), "stopped": stopped, "steps": state.global_step, "epochs_completed": state.epoch,
        "world_size": acc.num_processes, "final": final,
        "best": {"metric": cfg.eval.monitor, "value": state.best_metric, "step": state.best_step,
                 "checkpoint": state.best_checkpoint},
        "wall_seconds": time.time() - started, "throughput": speed.summary(), "skipped_steps": skipped_steps,
    }
    log.close()
    log.info(summary_table(summary))
    if acc.is_main_process and not dev_run:
        import json
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if cfg.log.plot:
            from runner.plot import plot_run
            plot_run(run_dir)
    acc.end_training()
    return 0


def lost_another_rank(error: Exception) -> bool:
    text = str(error)
    return torch.distributed.is_initialized() and (
        isinstance(error, torch.distributed.DistError)
        or any(sign in text for sign in ("Connection closed by peer", "Connection reset", "Timed out", "timed out")))


def rank_prefix() -> str:
    """Errors from other ranks say whose they are; the main process speaks plainly."""
    rank = int(os.environ.get("RANK", "0") or 0)
    return f"[rank {rank}] " if rank else ""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        options, overrides = configlib.parse_command_line(argv, FLAGS)
        if options.get("--help") or options.get("-h"):
            print(__doc__.strip() + f"\n\npresets: {', '.join(configlib.presets())}; "
                  "--print-config shows every key with its value.")
            return 0
        source = options.get("--config", "digits")
        cfg = configlib.load(Config, source, overrides)
        if options.get("--print-config"):
            print(configlib.dump(cfg), end="")
            return 0
        return run(cfg, Path(source).stem)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {rank_prefix()}{e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT) or debug:
            raise
        print(f"error: {rank_prefix()}cannot write {e.filename or 'the run directory'}: {e.strerror}; "
              f"files already written are kept", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except Exception as e:
        if not lost_another_rank(e) or debug:
            raise
        print(f"error: {rank_prefix()}another rank died or stalled longer than dist.timeout_s "
              f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})",
              file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(EXIT_LOST_RANK)  # a normal exit would tear the broken process group down and may hang


if __name__ == "__main__":
    sys.exit(main())
