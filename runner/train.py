"""Train an image classifier, from one CPU process to several GPU nodes.

    python runner/train.py --config digits [section.key=value ...]
    accelerate launch --multi_gpu --num_processes 2 runner/train.py --config cifar10
    torchrun --nproc_per_node 2 runner/train.py --config mnist

Flags: --config PRESET|FILE (default digits), --print-config, --debug (tracebacks), --help.
The stages of a run, in order: plan, run directory, processes, data, model and optimisation, resume,
announce, the loop, the preemption exit, the final evaluation and the summary.
"""
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repo's packages, not runner/*.py as top level
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from runner import config as configlib  # noqa: E402  (none of these import torch)
from runner import preemption  # noqa: E402
from runner.cli import Command  # noqa: E402
from runner.context import RunContext  # noqa: E402
from runner.distributed import is_main_rank  # noqa: E402
from runner.errors import EXIT_PREEMPTED  # noqa: E402
from runner.plan import Config, Plan  # noqa: E402
from runner.rundir import RunDir  # noqa: E402
from runner.state import PREEMPTED, RunState  # noqa: E402


def train(cfg: Config, config_label: str, started: float) -> int:
    from runner.data.identity import data_identity
    from runner.distributed import launched_world_size
    from runner.model import record_weights_identity

    plan = Plan.resolve(cfg, launched_world_size())
    record_weights_identity(cfg.model)  # before the fingerprint: a changed weights file is another experiment
    identity = data_identity(cfg.data)  # on every rank: a listing of the files, no image decoded
    run_dir = RunDir.resolve(cfg, config_label, identity.value, writes=not cfg.train.fast_dev_run)
    try:
        return run(cfg, plan, run_dir, identity, started)
    finally:
        run_dir.release()


def run(cfg: Config, plan: Plan, run_dir: RunDir, identity, started: float) -> int:
    import torch

    from runner.checkpoint import Checkpointer
    from runner.data.identity import KEY as DATA_IDENTITY
    from runner.data.identity import data_identity
    from runner.distributed import enable_debugging, make_accelerator
    from runner.loop import Trainer
    from runner.memory import resume_micro_batch
    from runner.metrics import Validation
    from runner.throughput import Throughput, device_peak_flops
    from runner.trackers import probe as probe_trackers
    from runner.tracking import RunLog, accelerate_trackers, check_trackers

    check_trackers(cfg.log, writes=run_dir.enabled)
    if cfg.dist.debug:
        enable_debugging(run_dir.scratch("flight_recorder"), print if is_main_rank() else lambda _: None)
    acc = make_accelerator(cfg.dist, cfg.train.mixed_precision, plan.world, run_dir.path,
                           accelerate_trackers(cfg.log.trackers) if run_dir.enabled else [])
    finished = run_dir.take_everywhere(cfg, acc, preflight=lambda: probe_trackers(cfg.log))
    if finished is not None:  # running a finished run again changes nothing
        return print_finished(run_dir, finished)
    torch.manual_seed(cfg.train.seed)  # model init: the same weights on every rank and world size
    splits, batches, plan = load_data(cfg, plan, acc, identity.scan)
    if identity.pending:  # the files were downloaded just now: they have an identity now
        run_dir.experiment[DATA_IDENTITY] = data_identity(cfg.data).value
    ctx = RunContext(cfg, plan, acc, run_dir, RunLog(acc, run_dir.metrics_file, cfg.log, plan.total_steps))
    model, optimizer, scheduler, flops, freezing, ema = build_training(ctx, splits)
    checkpoints = Checkpointer(acc, run_dir, cfg.checkpoint, ctx.log.info, ema)
    state = resume(ctx, checkpoints, splits)
    ctx = resume_micro_batch(ctx, batches, state.micro_batch)  # auto: the micro batch that last fit
    with ctx.log.tracking(run_dir, configlib.to_dict(cfg)):
        announce(ctx, splits, model, flops, freezing)
        speed = Throughput(acc.device, plan.world, flops, device_peak_flops(acc.device, cfg.log.peak_tflops))
        trainer = Trainer(ctx=ctx, model=model, optimizer=optimizer, scheduler=scheduler, batches=batches,
                          validation=Validation(cfg.eval, ctx, batches, splits, ema), checkpoints=checkpoints,
                          state=state, speed=speed, segment_started=started, freezing=freezing, ema=ema)
        outcome = trainer.run()
        if outcome == PREEMPTED:
            return preempted_exit(ctx, checkpoints, state)
        final = final_evaluation(trainer, splits)
        write_summary(ctx, trainer, final, outcome)
        acc.wait_for_everyone()  # a rank that tears its process group down while another still writes can abort
        acc.end_training()
        return 0


def load_data(cfg: Config, plan: Plan, acc, scan):
    """The splits (overfit mode trains and evaluates on a few batches, unaugmented), the batch source, and
    the plan completed with the training set's size. `scan`: a folder's listing, taken for its identity."""
    from runner.data.batches import make_batches
    from runner.data.order import TrainOrder
    from runner.data.splits import load_splits
    from runner.distributed import check_world_fits
    from runner.model import pretrained_preprocessing

    with acc.main_process_first():  # a download or a cache build, if any, happens once
        splits = load_splits(cfg.data, cfg.train.seed, pretrained_preprocessing(cfg.model), scan)
    augment = bool(cfg.data.crop_padding or cfg.data.flip)
    if plan.overfit_samples:
        splits, augment = splits.overfit(plan.overfit_samples), False
    check_world_fits(plan.world, plan.micro_batch, len(splits.train), len(splits.eval))
    plan = plan.for_train_size(len(splits.train))
    order = TrainOrder(plan, len(splits.train), cfg.train.seed, acc.process_index)
    batches = make_batches(cfg.data, splits, order, acc.device, cfg.train.seed, augment, cfg.model.channels_last)
    return splits, batches, plan


def build_training(ctx: RunContext, splits):
    """Model (checked against the data), optimizer and schedule, prepared by Accelerate; FLOPs per sample.
    CPU threads are decided here, once: how many pay off depends on the model's work per micro-step."""
    import torch

    from runner.distributed import cpu_threads
    from runner.ema import EmaWeights
    from runner.finetune import fine_tuning
    from runner.model import build_model, flops_per_sample
    from runner.optim import build_optimizer
    from runner.schedule import build_scheduler

    cfg, plan = ctx.cfg, ctx.plan
    model = build_model(cfg.model, splits.in_shape, splits.num_classes, cfg.data.name, initial_weights=True,
                        log=ctx.log.info)
    flops = flops_per_sample(model, splits.in_shape)
    torch.set_num_threads(cpu_threads(cfg.dist.threads, flops * plan.micro_batch))
    if cfg.model.sync_batchnorm and plan.world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # The average starts from the initial weights, a plain float32 copy made before any wrapper.
    ema = EmaWeights(model, cfg.train.ema_decay, ctx.acc.device)
    freezing, head = fine_tuning(model, cfg.model.name, splits.num_classes, cfg.model.freeze, cfg.model.unfreeze_epoch,
                                 cfg.optim.backbone_lr_factor)
    optimizer = build_optimizer(model, cfg.optim, head)
    scheduler = build_scheduler(optimizer, cfg.schedule, plan.schedule_steps, plan.steps_per_epoch)
    if cfg.model.compile:  # before prepare: compiling after the DDP wrap can crash
        model = torch.compile(model)
    model, optimizer, scheduler = ctx.acc.prepare(model, optimizer, scheduler)
    return model, optimizer, scheduler, flops, freezing, ema


def resume(ctx: RunContext, checkpoints, splits) -> RunState:
    """Apply the resume policy to the run directory (its lock is held), load the checkpoint to continue
    from, if any, and record config.yaml and data.json. Returns the run state to continue from."""
    from runner.data.identity import KEY as DATA_IDENTITY
    from runner.data.splits import data_card

    cfg, acc, run_dir = ctx.cfg, ctx.acc, ctx.run_dir
    run_dir.claim(cfg.resume, cfg.run.overwrite, bool(checkpoints.complete()))
    checkpoints.remove_stale_temporaries()
    acc.wait_for_everyone()
    resumed = checkpoints.resume(cfg.resume)
    acc.wait_for_everyone()  # every rank has read the checkpoint before any file is moved
    if resumed is not None:
        checkpoints.branch_from(resumed[0])
    run_dir.write("config.yaml", configlib.dump(cfg))
    run_dir.write("data.json", json.dumps({**data_card(splits), "identity": run_dir.experiment[DATA_IDENTITY]},
                                          indent=1))
    if resumed is None:
        return RunState(fingerprint=run_dir.experiment)
    path, state = resumed
    state.segments += 1
    ctx.log.continue_after(state.global_step, state.wall_seconds, state.segments)
    ctx.log.info(f"resumed from {path} (epoch {state.epoch + 1}, step {state.global_step})")
    return state


def announce(ctx: RunContext, splits, model, flops: float, freezing) -> None:
    from runner.distributed import communication_note
    from runner.model import parameter_count
    from runner.throughput import peak_memory_per_rank
    from runner.tracking import format_peaks

    cfg, plan, log = ctx.cfg, ctx.plan, ctx.log
    if ctx.run_dir.note:
        log.info(ctx.run_dir.note)
    test = f", test {len(splits.test)}" if splits.eval_split != "test" else ""
    log.info(f"run {ctx.run_dir} | world {plan.world} x {ctx.acc.device.type} | precision "
             f"{cfg.train.mixed_precision} | micro {plan.micro_batch} x accumulation {plan.accumulation} x world "
             f"{plan.world} = global {plan.global_batch}\n"
             f"data {cfg.data.name} ({cfg.data.loader} path{', ' + splits.description if splits.description else ''}"
             f"): train {len(splits.train)}, {splits.eval_split} {len(splits.eval)}{test} | model {cfg.model.name}: "
             f"{parameter_count(model):,} parameters{freezing.describe()}, "
             f"{flops / 1e6:.2f} MFLOP/sample (fwd+bwd) | {plan.total_steps} steps | peak memory so far "
             f"{format_peaks(peak_memory_per_rank(ctx.acc.device))}")
    advice = communication_note(plan.world, flops * plan.micro_batch, parameter_count(model), ctx.acc.device)
    if advice:
        log.info(advice)
    if splits.eval_split == "test":
        no_val = " and the folder has no val/" if cfg.data.name == "folder" else ""
        log.info(f"selected on test: data.val_fraction=0{no_val}, so the best checkpoint and early stopping "
                 f"use the test split and its final score is optimistic; set data.val_fraction (e.g. 0.1) to "
                 f"select on a held-out val split")


def preempted_exit(ctx: RunContext, checkpoints, state: RunState) -> int:
    """Exit so the job can be requeued or restarted (exit 75; 130 after Ctrl-C)."""
    saved = "checkpoint saved" if checkpoints.enabled else "nothing saved (fast_dev_run)"
    ctx.log.info(f"stopped by {preemption.signal_name()} at step {state.global_step}: {saved}")
    ctx.log.close()
    ctx.log.end_trackers(None)
    if is_main_rank() and checkpoints.enabled and ctx.cfg.run.requeue and preemption.should_requeue():
        preemption.requeue_slurm_job(ctx.log.info)
    ctx.acc.wait_for_everyone()  # a launcher kills the group when one rank exits: let the main one finish first
    ctx.acc.end_training()
    return preemption.exit_code(EXIT_PREEMPTED)


def final_evaluation(trainer, splits) -> dict:
    """The held-out split (reusing an evaluation of this very step), then test once, at the end."""
    validation, state = trainer.validation, trainer.state
    at_this_step = validation.last_step == state.global_step
    final = {splits.eval_split: validation.last if at_this_step else validation.evaluate(trainer.model, splits.eval)}
    if splits.eval_split == "val":
        final["test"] = validation.evaluate(trainer.model, splits.test)
    for split, metrics in final.items():
        trainer.ctx.log.event(state.global_step, state.epoch, f"final_{split}", metrics)
    return final


# The split that picks the best checkpoint and early-stops, by the split evaluated during training (overfit
# mode evaluates on the training samples it fits).
SELECTED_ON = {"val": "val", "test": "test", "overfit": "train"}


def write_summary(ctx: RunContext, trainer, final: dict, outcome: str) -> None:
    from runner.tracking import summary_table

    cfg, plan, run_dir = ctx.cfg, ctx.plan, ctx.run_dir
    state, speed = trainer.state, trainer.speed
    train_seconds, wall_seconds = trainer.times()
    summary = {
        "run": str(run_dir), "stopped": outcome, "steps": state.global_step, "epochs_completed": state.epoch,
        "world_size": plan.world, "global_batch_size": plan.global_batch, "final": final,
        # The micro batch the run ended with: train.micro_batch_size=auto may have shrunk it.
        "micro_batch_size": trainer.ctx.plan.micro_batch, "gradient_accumulation_steps": trainer.ctx.plan.accumulation,
        "selected_on": SELECTED_ON[trainer.validation.split_name],
        "length": {"epochs": cfg.train.epochs, "max_steps": cfg.train.max_steps},
        "best": {"split": trainer.validation.split_name, "metric": cfg.eval.monitor, "value": state.best_metric,
                 "step": state.best_step, "checkpoint": state.best_checkpoint if trainer.checkpoints.enabled else None},
        # Over all segments (a resumed run has several), and for this one.
        "wall_seconds": wall_seconds, "train_seconds": train_seconds, "segments": state.segments,
        "segment_wall_seconds": time.time() - trainer.segment_started, "segment_train_seconds": speed.total["seconds"],
        "startup_seconds": speed.startup_seconds(trainer.segment_started),
        "throughput": speed.summary(), "skipped_steps": trainer.skipped_steps,
    }
    ctx.log.close()
    ctx.log.info(summary_table(summary))
    run_dir.write("summary.json", json.dumps(summary, indent=1))
    if cfg.log.plot and run_dir.enabled and is_main_rank():
        from runner.plot import plot_run
        plot_run(run_dir.path)
    if run_dir.enabled:
        ctx.log.end_trackers(summary, [run_dir.path / f for f in ("summary.json", "config.yaml", "curves.png")])


def print_finished(run_dir: RunDir, summary: dict) -> int:
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
    code = COMMAND.main(argv)
    preemption.exit_keeping_handlers(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
