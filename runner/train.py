"""Train an image classifier, from one CPU process to several GPU nodes.

    python runner/train.py --config digits [section.key=value ...]
    accelerate launch --multi_gpu --num_processes 2 runner/train.py --config cifar10
    torchrun --nproc_per_node 2 runner/train.py --config mnist

Flags: --config PRESET|FILE (default digits), --print-config, --debug (tracebacks), --help.
The stages of a run, in order: plan, run directory, processes, data, model and optimisation, resume,
announce, the loop, the preemption exit, the final evaluation and the summary.
"""
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repo's packages, not runner/*.py as top level
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from runner import config as configlib  # noqa: E402  (none of these import torch)
from runner import preemption  # noqa: E402
from runner.cli import Command, is_main_rank  # noqa: E402
from runner.errors import EXIT_PREEMPTED  # noqa: E402
from runner.plan import Config, Plan  # noqa: E402
from runner.rundir import RunLock, finished_summary, fingerprint, prepare_run_dir, resolve_run_dir  # noqa: E402


def train(cfg: Config, config_label: str, started: float) -> int:
    from runner.distributed import launched_world_size

    plan = Plan.resolve(cfg, launched_world_size())
    experiment = fingerprint(cfg)
    run_dir, note = resolve_run_dir(cfg.run, config_label, experiment)
    finished = finished_summary(run_dir, cfg, experiment) if plan.writes and cfg.resume == "auto" else None
    if finished is not None:  # running a finished run again changes nothing
        return print_finished(run_dir, finished)
    lock = RunLock(run_dir)
    try:
        return train_locked(cfg, plan, run_dir, note, started, lock)
    finally:
        lock.release()


def train_locked(cfg: Config, plan: Plan, run_dir: Path, note: str | None, started: float, lock: RunLock) -> int:
    import torch

    from runner.checkpoint import Checkpointer
    from runner.distributed import enable_debugging, make_accelerator
    from runner.loop import PREEMPTED
    from runner.tracking import RunLog, check_trackers

    check_trackers(cfg.log.trackers)
    if cfg.dist.debug:
        dumps = run_dir / "flight_recorder" if plan.writes else Path(tempfile.gettempdir()) / "runner-flight-recorder"
        enable_debugging(dumps, print if is_main_rank() else lambda _: None)
    acc = make_accelerator(cfg.dist, cfg.train.mixed_precision, run_dir, cfg.log.trackers if plan.writes else [])
    torch.manual_seed(cfg.train.seed)  # model init: the same weights on every rank and world size
    splits, batches, plan = load_data(cfg, plan, acc)
    model, optimizer, scheduler, flops = build_training(cfg, plan, splits, acc)
    log = RunLog(acc, run_dir / "metrics.jsonl" if plan.writes else None, cfg.log, plan.total_steps)
    checkpoints = Checkpointer(acc, run_dir, cfg.checkpoint, log.info)
    state, resumed_from = resume(cfg, plan, acc, run_dir, checkpoints, splits, lock)
    if resumed_from is not None:
        log.continue_after(state.global_step, state.wall_seconds)
        log.info(f"resumed from {resumed_from} (epoch {state.epoch + 1}, step {state.global_step})")
    if plan.writes:
        log.start_trackers(run_dir.name, configlib.to_dict(cfg))
    announce(log, cfg, plan, acc, run_dir, note, splits, model, flops)
    trainer = make_trainer(cfg, plan, acc, model, optimizer, scheduler, batches, splits, checkpoints, log, state,
                           flops, started)
    outcome = trainer.run()
    if outcome == PREEMPTED:
        return preempted_exit(cfg, plan, acc, log, state)
    final = final_evaluation(trainer, splits)
    write_summary(cfg, plan, acc, log, run_dir, trainer, final, outcome)
    acc.wait_for_everyone()  # a rank that tears its process group down while another still writes can abort
    acc.end_training()
    return 0


def load_data(cfg: Config, plan: Plan, acc):
    """The splits (overfit mode trains and evaluates on a few batches, unaugmented) and the batch source."""
    from runner.data.batches import make_batches
    from runner.data.order import TrainOrder
    from runner.data.splits import load_splits
    from runner.distributed import check_world_fits

    with acc.main_process_first():  # a download or a cache build, if any, happens once
        splits = load_splits(cfg.data, cfg.train.seed)
    augment = bool(cfg.data.crop_padding or cfg.data.flip)
    if plan.overfit_samples:
        splits, augment = splits.overfit(plan.overfit_samples), False
    check_world_fits(plan.world, plan.micro_batch, len(splits.train), len(splits.eval))
    plan = plan.for_train_size(len(splits.train))
    order = TrainOrder(plan, len(splits.train), cfg.train.seed, acc.process_index)
    batches = make_batches(cfg.data, splits, order, acc.device, cfg.train.seed, augment, cfg.model.channels_last)
    return splits, batches, plan


def build_training(cfg: Config, plan: Plan, splits, acc):
    """Model (checked against the data), optimizer and schedule, prepared by Accelerate; FLOPs per sample."""
    import torch

    from runner.distributed import cpu_threads
    from runner.model import build_model, flops_per_sample
    from runner.optim import build_optimizer
    from runner.schedule import build_scheduler

    model = build_model(cfg.model, splits.in_shape, splits.num_classes, cfg.data.name)
    flops = flops_per_sample(model, splits.in_shape)
    torch.set_num_threads(cpu_threads(cfg.dist.threads, flops * plan.micro_batch))
    if cfg.model.sync_batchnorm and plan.world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, plan.schedule_steps, plan.steps_per_epoch)
    if cfg.model.compile:  # before prepare: compiling after the DDP wrap can crash
        model = torch.compile(model)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    return model, optimizer, scheduler, flops


def resume(cfg: Config, plan: Plan, acc, run_dir: Path, checkpoints, splits, lock: RunLock):
    """Take the run directory's lock, enforce the resume policy, load the checkpoint to continue from (if
    any), and write config.yaml and data.json. Returns (run state, checkpoint resumed from or None)."""
    from runner.data.splits import data_card
    from runner.state import RunState

    state = RunState(fingerprint=fingerprint(cfg))
    if not plan.writes:
        return state, None
    if acc.is_main_process:
        lock.acquire()  # before anything is written: a second launch on this directory stops here
        prepare_run_dir(run_dir, cfg.resume, cfg.run.overwrite, bool(checkpoints.complete()))
        checkpoints.remove_stale_temporaries()
    acc.wait_for_everyone()
    resumed = checkpoints.resume(cfg.resume, state.fingerprint)
    acc.wait_for_everyone()  # every rank has read the checkpoint before any file is moved
    if resumed is not None and acc.is_main_process:
        checkpoints.branch_from(resumed[0])
    if acc.is_main_process:
        (run_dir / "config.yaml").write_text(configlib.dump(cfg))
        (run_dir / "data.json").write_text(json.dumps(data_card(splits), indent=1))
    if resumed is None:
        return state, None
    resumed[1].segments += 1
    return resumed[1], resumed[0]


def announce(log, cfg: Config, plan: Plan, acc, run_dir: Path, note: str | None, splits, model, flops) -> None:
    from runner.distributed import communication_note
    from runner.model import parameter_count

    if note:
        log.info(note)
    test = f", test {len(splits.test)}" if splits.eval_split != "test" else ""
    log.info(f"run {run_dir if plan.writes else '(fast_dev_run: nothing is written)'} | world {plan.world} x "
             f"{acc.device.type} | precision {cfg.train.mixed_precision} | micro {plan.micro_batch} x accumulation "
             f"{plan.accumulation} x world {plan.world} = global {plan.global_batch}\n"
             f"data {cfg.data.name} ({cfg.data.loader} path{', ' + splits.description if splits.description else ''}"
             f"): train {len(splits.train)}, {splits.eval_split} {len(splits.eval)}{test} | model {cfg.model.name}: {parameter_count(model):,} parameters, "
             f"{flops / 1e6:.2f} MFLOP/sample (fwd+bwd) | {plan.total_steps} steps")
    advice = communication_note(plan.world, flops * plan.micro_batch, parameter_count(model), acc.device)
    if advice:
        log.info(advice)


def make_trainer(cfg, plan, acc, model, optimizer, scheduler, batches, splits, checkpoints, log, state, flops,
                 started: float):
    from runner.loop import Trainer
    from runner.metrics import Evaluator
    from runner.throughput import Throughput, device_peak_flops

    speed = Throughput(acc.device, plan.world, flops, device_peak_flops(acc.device, cfg.log.peak_tflops))
    return Trainer(plan, cfg, acc, model, optimizer, scheduler, batches, splits.eval, splits.eval_split,
                   splits.class_names, functools.partial(Evaluator, splits.num_classes, acc.device), checkpoints,
                   log, state, speed, segment_started=started)


def preempted_exit(cfg: Config, plan: Plan, acc, log, state) -> int:
    """Exit so the job can be requeued or restarted (exit 75)."""
    saved = "checkpoint saved" if plan.writes else "nothing saved (fast_dev_run)"
    log.info(f"stopped by {preemption.signal_name()} at step {state.global_step}: {saved}")
    log.close()
    if acc.is_main_process and plan.writes and cfg.run.requeue and preemption.should_requeue():
        preemption.requeue_slurm_job(log.info)
    acc.wait_for_everyone()  # a launcher kills the group when one rank exits: let the main one finish first
    acc.end_training()
    return EXIT_PREEMPTED


def final_evaluation(trainer, splits) -> dict:
    """The held-out split (reusing an evaluation of this very step), then test once, at the end."""
    at_this_step = trainer.last_eval_step == trainer.state.global_step
    final = {splits.eval_split: trainer.last_eval if at_this_step else trainer.evaluate(splits.eval)}
    if splits.eval_split == "val":
        final["test"] = trainer.evaluate(splits.test)
    for split, metrics in final.items():
        trainer.log.event(trainer.state.global_step, trainer.state.epoch, f"final_{split}", metrics)
    return final


def write_summary(cfg, plan, acc, log, run_dir, trainer, final, outcome) -> None:
    from runner.tracking import summary_table, write_summary as write

    state, speed = trainer.state, trainer.speed
    train_seconds, wall_seconds = trainer.times()
    summary = {
        "run": str(run_dir), "stopped": outcome, "steps": state.global_step, "epochs_completed": state.epoch,
        "world_size": plan.world, "global_batch_size": plan.global_batch, "final": final,
        "length": {"epochs": cfg.train.epochs, "max_steps": cfg.train.max_steps},
        "best": {"split": trainer.eval_split, "metric": cfg.eval.monitor, "value": state.best_metric,
                 "step": state.best_step, "checkpoint": state.best_checkpoint},
        # Over all segments (a resumed run has several), and for this one.
        "wall_seconds": wall_seconds, "train_seconds": train_seconds, "segments": state.segments,
        "segment_wall_seconds": time.time() - trainer.segment_started, "segment_train_seconds": speed.total["seconds"],
        "startup_seconds": speed.startup_seconds(trainer.segment_started),
        "throughput": speed.summary(), "skipped_steps": trainer.skipped_steps,
    }
    log.close()
    log.info(summary_table(summary))
    if acc.is_main_process and plan.writes:
        write(run_dir, summary)
        if cfg.log.plot:
            from runner.plot import plot_run
            plot_run(run_dir)


def print_finished(run_dir: Path, summary: dict) -> int:
    from runner.tracking import summary_table

    if is_main_rank():
        print(f"{run_dir} has already finished ({summary['stopped']}); nothing to do. Its summary:")
        print(summary_table(summary))
    return 0


def run_command(options: dict, overrides: list) -> int:
    started = time.time()
    preemption.install()  # before torch is imported: a SIGUSR1 during the slow start-up is kept, not fatal
    source = options.get("--config", "digits")
    cfg = configlib.load(Config, source, overrides)
    if options.get("--print-config"):
        print(configlib.dump(cfg), end="")
        return 0
    return train(cfg, Path(source).stem, started)


COMMAND = Command(__doc__, {"--config": "value", "--print-config": "switch"}, run_command,
                  epilog=lambda: f"\n\npresets: {', '.join(configlib.presets())}; --print-config shows every key.")


def main(argv=None) -> int:
    return COMMAND.main(argv)


if __name__ == "__main__":
    sys.exit(main())
