"""What the run reports: console lines or a progress bar, metrics.jsonl, trackers and the summary.

metrics.jsonl is the source of truth; trackers get the same numbers: TensorBoard (the default) through
Accelerate's tracking API, MLflow and W&B through runner/trackers.py, which keeps one tracker run across
the segments of a resumed run. Only the main process writes, prints or talks to a tracker; other ranks speak
only on errors.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from runner.config import flatten, setting
from runner.distributed import is_main_rank
from runner.errors import ConfigError
from runner.trackers import OWN_TRACKERS, Trackers, check_installed

# Accelerate's tracking is imported inside check_trackers: it pulls in torch, which --help and config errors
# never load.


@dataclass
class LogConfig:
    every_steps: int = setting(0, min=0)                 # a train point every N steps (0: total steps / 100)
    trackers: list[str] = setting(["tensorboard"])       # tensorboard, mlflow, wandb, or any Accelerate supports
    tracking_uri: str = ""                               # MLflow server (default: MLFLOW_TRACKING_URI)
    project: str = "runner"                              # W&B project; MLflow experiment unless `group` is set
    entity: str = ""                                     # W&B entity (team or user; default: yours)
    group: str = ""                                      # W&B group and MLflow experiment (a sweep: its name)
    tracker_errors: str = setting("fail", choices=["fail", "warn"])  # an unreachable tracker at start
    progress: str = setting("auto", choices=["auto", "bar", "lines"])   # auto: a bar on a terminal
    plot: bool = True                                    # draw curves.png at the end
    peak_tflops: float = setting(0.0, min=0.0)           # per-device peak for MFU (0: known GPUs only)


def check_trackers(cfg: LogConfig, writes: bool) -> None:
    """Against Accelerate's list, plus what MLflow and W&B need (for a run that writes: a fast_dev_run
    starts no tracker), before anything starts."""
    import os

    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    unknown = [t for t in cfg.trackers if t not in LOGGER_TYPE_TO_CLASS]
    if unknown:
        raise ConfigError(f"log.trackers: unknown tracker {unknown[0]!r}; Accelerate supports "
                          f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
    missing = check_installed(cfg.trackers)
    if missing:
        raise ConfigError(f"log.trackers: {missing[0]} is not installed; pip install -e '.[track]'")
    if writes and "mlflow" in cfg.trackers and not (cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ConfigError("log.trackers=[mlflow] needs a server: set MLFLOW_TRACKING_URI or log.tracking_uri")


def accelerate_trackers(names: list[str]) -> list[str]:
    """The trackers Accelerate drives (TensorBoard and the rest): MLflow and W&B are driven by runner.trackers,
    so that a resumed run continues its tracker run instead of starting a new one."""
    return [name for name in names if name not in OWN_TRACKERS]


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RunLog:
    """`time` in metrics.jsonl counts wall seconds since the run first started, across resumed segments."""

    def __init__(self, accelerator, metrics_file: Path | None, cfg: LogConfig, total_steps: int):
        self.acc, self.total_steps = accelerator, total_steps
        self.every_steps = cfg.every_steps or max(1, total_steps // 100)  # auto: about 100 points a run
        self.main = is_main_rank()
        self.bar = None
        use_bar = cfg.progress == "bar" or (cfg.progress == "auto" and sys.stdout.isatty())
        if self.main and use_bar:
            # A terminal that reports a 0x0 size (a fresh pty) would hide the bar: fall back to 100x20.
            size = shutil.get_terminal_size((100, 20))
            self.bar = tqdm(total=total_steps, unit="step", ncols=size.columns, nrows=size.lines, file=sys.stdout)
        self.metrics_file = metrics_file
        self.started = time.time()
        self.segment = 1
        self.tracker_config: tuple[str, dict] | None = None
        self.trackers = Trackers(cfg, self.warn)
        self.window_losses: list[float] = []  # each step's loss (mean over ranks) since the last train point

    def due(self, step: int) -> bool:
        """A train record falls on this step (every log.every_steps, and the last step)."""
        return step % self.every_steps == 0 or step == self.total_steps

    def add_step_loss(self, loss: float) -> None:
        self.window_losses.append(loss)

    def take_window_loss(self) -> float:
        """The mean training loss over the steps since the last train point: a curve of single steps' losses
        would show the noise of a batch, not the trend."""
        losses, self.window_losses = self.window_losses, []
        return sum(losses) / len(losses) if losses else float("nan")

    def start_trackers(self, run_dir, config: dict) -> None:
        """MLflow and W&B start (or continue their run) now, so that an unreachable one stops the run before
        it trains. Accelerate's trackers start with the first record: their imports and writers stay out of
        the start-up time."""
        flat = {k: str(v) if isinstance(v, (list, dict)) or v is None else v for k, v in flatten(config).items()}
        self.tracker_config = (run_dir.name, flat)
        if self.main and run_dir.enabled:
            self.trackers.start(run_dir, flat)

    @contextlib.contextmanager
    def tracking(self, run_dir, config: dict):
        """The trackers, started now (start_trackers) and ended by end_trackers; a run that stops on an error
        marks its tracker runs failed instead of leaving them running."""
        self.start_trackers(run_dir, config)
        try:
            yield
        except BaseException:
            if self.main:
                self.trackers.fail()
            raise

    def end_trackers(self, summary: dict | None, files: list[Path] = ()) -> None:
        """Finished (summary: the best metric and the run's files go to the tracker run) or preempted
        (summary None: the tracker run waits for the next segment). Then which steps a failed tracker missed."""
        if not self.main:
            return
        if summary is None:
            self.trackers.suspend()
        else:
            self.trackers.finish(best_scalars(summary), [f for f in files if f.is_file()])
        missed = self.trackers.report()
        if missed:
            self.info(missed)

    def warn(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def info(self, message: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def continue_after(self, step: int, wall_seconds: float, segment: int) -> None:
        """After a resume: time goes on from the earlier segments' wall time, records say which segment
        wrote them (curves.png marks the resumes), and the records the interrupted run logged past its
        checkpoint are dropped."""
        self.started, self.segment = time.time() - wall_seconds, segment
        if not (self.main and self.metrics_file and self.metrics_file.exists()):
            return
        kept, last_time = [], 0.0
        for line in self.metrics_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by kill -9
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
                last_time = max(last_time, record.get("time", 0.0))
        self.metrics_file.write_text("".join(line + "\n" for line in kept))
        # Records of the checkpoint's own step may come after it was saved (a final evaluation): time goes on
        # from the latest of them, so it never runs backwards.
        self.started = min(self.started, time.time() - last_time)

    def event(self, step: int, epoch: int, split: str, metrics: dict, **extra) -> None:
        if not self.main:
            return
        record = {"step": step, "epoch": epoch, "split": split, "time": round(time.time() - self.started, 3),
                  "segment": self.segment, "metrics": metrics, **extra}
        if self.metrics_file:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tracker_config is not None:
            self.acc.init_trackers(*self.tracker_config)
            self.tracker_config = None
        scalars = {f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        scalars.update({f"throughput/{k}": v for k, v in (extra.get("throughput") or {}).items()})
        if "lr" in extra:
            scalars["train/lr"] = extra["lr"]
        for name, by_class in (metrics.get("per_class") or {}).items():
            scalars[f"{split}/recall/{name}"] = by_class["recall"]
        if self.acc.trackers:
            self.acc.log(scalars, step=step)
        self.trackers.log(scalars, step)

    def progress(self, step: int, epoch: int, epochs: int, loss: float, lr: float, speed: dict | None) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss:.4f}", lr=f"{lr:.3g}", refresh=False)
            self.bar.refresh()
            return
        if speed is None:
            return
        remaining = (self.total_steps - step) * speed["step_time_ms"] / 1000
        print(f"epoch {epoch + 1}/{epochs}  step {step}/{self.total_steps}  loss {loss:.4f}  lr {lr:.4g}  "
              f"{speed['img_per_s']:,.0f} img/s  data {100 * speed['data_wait_fraction']:.0f}%  "
              f"eta {format_eta(remaining)}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_peaks(peaks: list[float]) -> str:
    """`1,234 MiB` for one rank, `rank 0 1,234 MiB, rank 1 1,230 MiB` for several."""
    if len(peaks) == 1:
        return f"{peaks[0]:,.0f} MiB"
    return ", ".join(f"rank {rank} {mb:,.0f} MiB" for rank, mb in enumerate(peaks))


def best_scalars(summary: dict) -> dict:
    """The best value of the monitored metric as a tracker scalar (`_step`: the step of the run's end). The
    final metrics are already there: the final evaluations are logged like any other."""
    best = summary.get("best") or {}
    scalars = {"_step": summary["steps"]}
    if isinstance(best.get("value"), (int, float)):
        scalars[f"best_{best['split']}/{best['metric']}"] = best["value"]
    return scalars


def summary_table(summary: dict) -> str:
    lines = ["", "=" * 64, f"run {summary['run']}: {summary['stopped']} after {summary['steps']} steps "
             f"({summary['epochs_completed']} epochs) in {summary['wall_seconds']:.1f} s"
             + (f" ({summary['segment_wall_seconds']:.1f} s in this segment)" if summary["segments"] > 1 else "")]
    for split, metrics in summary["final"].items():
        lines.append(f"  {split:<5} accuracy {100 * metrics['accuracy']:6.2f}%   top5 "
                     f"{100 * metrics['top5_accuracy']:6.2f}%   f1 {metrics['f1']:.4f}   loss {metrics['loss']:.4f}"
                     f"   ({metrics['samples']} samples)")
    best = summary.get("best")
    if best and best.get("value") is not None:
        lines.append(f"  best  {best['split']} {best['metric']} {best['value']:.4f} at step {best['step']}"
                     + (f" ({best['checkpoint']})" if best.get("checkpoint") else ""))
    t = summary["throughput"]
    lines.append(f"  speed {t['img_per_s']:,.0f} img/s ({t['img_per_s_per_device']:,.0f} per device), "
                 f"step {t['step_time_ms']:.1f} ms, data wait {100 * t['data_wait_fraction']:.0f}%, "
                 # Summaries written before peaks were gathered per rank hold rank 0's alone.
                 f"peak memory {format_peaks(t.get('peak_memory_mb_per_rank', [t['peak_memory_mb']]))}"
                 + (f", MFU {100 * t['mfu']:.1f}%" if "mfu" in t else "")
                 + f"; start-up {summary['startup_seconds']:.1f} s")
    if summary.get("skipped_steps"):
        lines.append(f"  fp16  {summary['skipped_steps']} optimizer steps skipped by the GradScaler (overflow)")
    lines.append("=" * 64)
    return "\n".join(lines)

